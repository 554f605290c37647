"""The model repository: registered models kept on disk, one file each, loaded at start-up.

File format (`<name>.convmodel`): an 8-byte magic, the SHA-256 of the payload, then the payload — the
RegisterModelRequest exactly as received (specs + weights). The digest makes a truncated or damaged file detectable
(protobuf alone happily parses many truncations); such a file is logged and skipped at start-up, never a crash.

Writes are atomic: a temporary file in the same folder, fsync, rename over the old file, fsync of the folder. A
reader (or a restart after `kill -9`) sees the old model or the new one, never half of one.
"""
import hashlib
import logging
import os
import tempfile
import threading

from convproto.convservice.v1 import conv_pb2

from ._errors import ModelNotFound
from ._model import Model, check_model_name

__all__ = ["ModelRepository", "MODEL_SUFFIX"]

log = logging.getLogger("server")

MODEL_SUFFIX = ".convmodel"
_MAGIC = b"CONVMDL1"
_DIGEST = 32
_TMP_PREFIX = ".tmp-"


class CorruptModelFile(Exception):
    """A repository file that cannot be a model we wrote."""


def _encode(request):
    payload = request.SerializeToString(deterministic=True)
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _decode(blob):
    if len(blob) < len(_MAGIC) + _DIGEST or not blob.startswith(_MAGIC):
        raise CorruptModelFile("not a model file (bad header)")
    digest = blob[len(_MAGIC):len(_MAGIC) + _DIGEST]
    payload = memoryview(blob)[len(_MAGIC) + _DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptModelFile("checksum mismatch (truncated or damaged)")
    request = conv_pb2.RegisterModelRequest()
    request.ParseFromString(payload)
    return request


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ModelRepository:
    """Registered models: in memory for serving, on disk for surviving restarts.

    Parameters
    ----------
    root : str
        The folder (created if missing).
    plan_cache_size : int
        Plans kept per model (see `Model.plans`).
    """

    def __init__(self, root, *, plan_cache_size=8):
        self.root = os.path.abspath(root)
        self._plan_cache_size = plan_cache_size
        self._models = {}
        self._lock = threading.Lock()  # serializes writers; readers take a dict snapshot
        os.makedirs(self.root, exist_ok=True)

    def _path(self, name):
        # check_model_name allows no separator and no leading dot: the path stays inside root.
        return os.path.join(self.root, check_model_name(name) + MODEL_SUFFIX)

    # ------------------------------------------------------------------ start-up
    def load_all(self):
        """Load every model file in the folder; log and skip any that is corrupt or invalid.

        Returns
        -------
        (list of str, list of str)
            Names loaded, and file names skipped.
        """
        loaded, skipped = [], []
        for entry in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, entry)
            if entry.startswith(_TMP_PREFIX):
                # Left by a crash in the middle of a write; the rename never happened, so the old model is intact.
                log.warning("removing leftover temporary file %s", path)
                try:
                    os.unlink(path)
                except OSError as exc:
                    log.warning("could not remove %s: %s", path, exc)
                continue
            if not entry.endswith(MODEL_SUFFIX) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as f:
                    request = _decode(f.read())
                model = Model.from_request(request, plan_cache_size=self._plan_cache_size)
                if model.name + MODEL_SUFFIX != entry:
                    raise CorruptModelFile(f"holds model {model.name!r}, which belongs in another file")
            except Exception as exc:  # noqa: BLE001 - a bad file must never stop the server
                log.warning("skipping corrupt model file %s: %s", path, exc)
                skipped.append(entry)
                continue
            self._models[model.name] = model
            loaded.append(model.name)
        return loaded, skipped

    # ------------------------------------------------------------------ queries
    def get(self, name):
        """Return the model called `name`, or raise ModelNotFound."""
        model = self._models.get(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def names(self):
        return sorted(self._models)

    def models(self):
        return [self._models[n] for n in sorted(self._models)]

    # ------------------------------------------------------------------ changes
    def register(self, request):
        """Check the request, write it to disk atomically, then serve it (replacing a model of the same name)."""
        model = Model.from_request(request, plan_cache_size=self._plan_cache_size)
        path = self._path(model.name)
        blob = _encode(request)
        with self._lock:
            fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
                raise
            _fsync_dir(self.root)
            self._models = {**self._models, model.name: model}
        return model

    def delete(self, name):
        """Forget the model and remove its file; raise ModelNotFound if there is none."""
        path = self._path(name)
        with self._lock:
            if name not in self._models:
                raise ModelNotFound(name)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            _fsync_dir(self.root)
            self._models = {k: v for k, v in self._models.items() if k != name}
