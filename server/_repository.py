"""The model repository: registered models kept on disk, one file each, loaded at start-up.

File format (`<name>.convmodel`): an 8-byte magic, the SHA-256 of the payload, then the payload — the model as a
serialized RegisterModelRequest (specs + weights; `_codec.encode_model`, deterministic). The digest makes a truncated or damaged file detectable
(protobuf alone happily parses many truncations); such a file is logged and skipped at start-up, never a crash.

Writes are atomic: a temporary file in the same folder, fsync, rename over the old file, fsync of the folder. A
reader (or a restart after `kill -9`) sees the old model or the new one, never half of one.
"""
import errno
import hashlib
import logging
import os
import tempfile
import threading
import time

from ._batcher import resolve_batching
from ._codec import decode_model_file, encode_model
from ._errors import LimitExceeded, ModelExists, ModelNotFound, RepositoryError
from ._limits import check_count
from ._model import Model, check_model_name

__all__ = ["ModelRepository", "MODEL_SUFFIX"]

log = logging.getLogger("server")

MODEL_SUFFIX = ".convmodel"
_MAGIC = b"CONVMDL1"
_DIGEST = 32
_TMP_PREFIX = ".tmp-"


class CorruptModelFile(Exception):
    """A repository file that cannot be a model we wrote."""


def _encode(model):
    payload = encode_model(model)
    return _MAGIC + hashlib.sha256(payload).digest() + payload


def _decode(blob):
    if len(blob) < len(_MAGIC) + _DIGEST or not blob.startswith(_MAGIC):
        raise CorruptModelFile("not a model file (bad header)")
    digest = blob[len(_MAGIC):len(_MAGIC) + _DIGEST]
    payload = memoryview(blob)[len(_MAGIC) + _DIGEST:]
    if hashlib.sha256(payload).digest() != digest:
        raise CorruptModelFile("checksum mismatch (truncated or damaged)")
    return decode_model_file(payload)


def _write_error(root, exc):
    """The domain error for an OSError while writing the repository: full -> LimitExceeded, else RepositoryError."""
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return LimitExceeded(f"the model repository {root} is full ({reason}); the model was not registered: free "
                             f"space or delete models")
    return RepositoryError(f"cannot write the model repository {root} ({reason}); nothing was changed. The server "
                           f"keeps serving the models it has; fix the folder (permissions, mount, free space)")


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: A temporary file older than this is a leftover of a crash; a younger one may be another replica's write in progress.
_STALE_TMP_SECONDS = 600


def _signature(path):
    """What identifies one version of a model file: a rename over it gives a new inode and mtime."""
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class ModelRepository:
    """Registered models: in memory for serving, on disk for surviving restarts and for sharing between replicas.

    Several server replicas may share one folder (a volume): each serves what the folder holds. A lookup compares
    the model's file with the version in memory (one `stat`) and loads a model another replica registered or
    replaced, and forgets one another replica deleted; listing rescans the folder.

    Parameters
    ----------
    root : str
        The folder (created if missing).
    plan_cache_size : int
        Plans kept per model (see `Model.plans`).
    """

    def __init__(self, root, *, plan_cache_size=8, max_models=None, max_layers=None, batching_defaults=None):
        self.root = os.path.abspath(root)
        self._batching_defaults = batching_defaults  # BatchingConfig: defaults and cap of dynamic batching
        self._plan_cache_size = plan_cache_size
        self._max_models = max_models  # --max-models / --max-layers (None: unlimited)
        self._max_layers = max_layers
        self._models = {}
        self._sigs = {}                 # name -> _signature of the file the in-memory model came from
        self._lock = threading.Lock()  # serializes writers; readers take a dict snapshot
        os.makedirs(self.root, exist_ok=True)

    def _path(self, name):
        # check_model_name allows no separator and no leading dot: the path stays inside root.
        return os.path.join(self.root, check_model_name(name) + MODEL_SUFFIX)

    def _load_file(self, path, entry):
        """Read, check and build the model in `path`; raise on anything wrong with it."""
        sig = _signature(path)
        with open(path, "rb") as f:
            name, layers, batching = _decode(f.read())
        model = self._build(name, layers, batching)
        if model.name + MODEL_SUFFIX != entry:
            raise CorruptModelFile(f"holds model {model.name!r}, which belongs in another file")
        return model, sig

    def _build(self, name, layers, batching):
        """Model.build, plus its dynamic-batching settings resolved against the server's defaults."""
        model = Model.build(name, layers, plan_cache_size=self._plan_cache_size)
        if batching is not None:
            model.batching = resolve_batching(batching, self._batching_defaults)
            model.batching_request = batching
        return model

    def _install(self, name, model, sig):
        with self._lock:
            if model is None:
                self._models = {k: v for k, v in self._models.items() if k != name}
                self._sigs.pop(name, None)
            else:
                self._models = {**self._models, name: model}
                self._sigs[name] = sig

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
                self._remove_stale_tmp(path)
                continue
            if not entry.endswith(MODEL_SUFFIX) or not os.path.isfile(path):
                continue
            try:
                model, sig = self._load_file(path, entry)
            except Exception as exc:  # noqa: BLE001 - a bad file must never stop the server
                log.warning("skipping corrupt model file %s: %s", path, exc)
                skipped.append(entry)
                continue
            self._install(model.name, model, sig)
            loaded.append(model.name)
        return loaded, skipped

    @staticmethod
    def _remove_stale_tmp(path):
        # Left by a crash in the middle of a write; the rename never happened, so the old model is intact. A recent
        # one may belong to another replica writing right now: leave it.
        try:
            if time.time() - os.stat(path).st_mtime < _STALE_TMP_SECONDS:
                return
            log.warning("removing leftover temporary file %s", path)
            os.unlink(path)
        except OSError as exc:
            log.warning("could not remove %s: %s", path, exc)

    # ------------------------------------------------------------------ queries
    def _sync(self, name):
        """Bring `name` in line with its file (another replica may have registered, replaced or deleted it)."""
        try:
            path = self._path(name)
        except ValueError:
            return None
        try:
            sig = _signature(path)
        except FileNotFoundError:
            sig = None
        except OSError as exc:  # an unreadable folder: keep serving what we have
            log.warning("cannot stat %s: %s", path, exc)
            return self._models.get(name)
        if sig is None:
            if name in self._models:
                self._install(name, None, None)
            return None
        if sig == self._sigs.get(name):
            return self._models[name]
        try:
            model, sig = self._load_file(path, name + MODEL_SUFFIX)
        except FileNotFoundError:
            return self._sync(name) if os.path.exists(path) else None
        except Exception as exc:  # noqa: BLE001 - e.g. a file caught mid-copy by hand: keep the old version
            log.warning("cannot load model file %s: %s", path, exc)
            return self._models.get(name)
        self._install(name, model, sig)
        return model

    def get(self, name):
        """Return the model called `name`, or raise ModelNotFound."""
        model = self._sync(name)
        if model is None:
            raise ModelNotFound(name)
        return model

    def refresh(self):
        """Rescan the folder: pick up models other replicas added, drop the ones they deleted."""
        try:
            on_disk = {e[:-len(MODEL_SUFFIX)] for e in os.listdir(self.root)
                       if e.endswith(MODEL_SUFFIX) and not e.startswith(_TMP_PREFIX)}
        except OSError as exc:
            log.warning("cannot list %s: %s", self.root, exc)
            return
        for name in sorted(on_disk | set(self._models)):
            self._sync(name)

    def names(self):
        return sorted(self._models)

    def models(self):
        self.refresh()
        return [m for m in (self._models.get(n) for n in sorted(self._models)) if m is not None]

    # ------------------------------------------------------------------ changes
    def register(self, name, layers, batching=None):
        """Check the model (`name`, a list of `Layer`), write it to disk atomically, then serve it.

        A name that is already registered is refused (ModelExists -> ALREADY_EXISTS) unless the request is identical
        to the registered one (then it is a no-op that returns the model: retries and several load generators
        registering the same model stay safe). To replace a model, delete it first. The file is published with
        `os.link`, which fails if the name exists, so two replicas sharing the folder cannot overwrite each other
        either. Write failures raise RepositoryError (or LimitExceeded when the disk is full) and change nothing.
        """
        check_count("layers in the model", len(layers), self._max_layers, "--max-layers")
        model = self._build(name, layers, batching)
        path = self._path(model.name)
        blob = _encode(model)
        self._sync(model.name)  # another replica may have registered it
        exists = ModelExists(f"model {model.name!r} is already registered; delete it first (DeleteModel) to "
                             f"replace it, or choose another name")
        with self._lock:
            current = self._models.get(model.name)
            if current is not None:
                if _encode(current) == blob:
                    return current  # the same registration again
                raise exists
            check_count("registered models", len(self._models) + 1, self._max_models, "--max-models")
            try:
                fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=self.root)
            except OSError as exc:
                raise _write_error(self.root, exc) from None
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # atomic, and never replaces: FileExistsError if the name was taken
                _fsync_dir(self.root)
            except FileExistsError:
                try:  # another replica won the race: fine if it registered the very same model
                    with open(path, "rb") as f:
                        same = f.read() == blob
                except OSError:
                    same = False
                if not same:
                    raise exists from None
            except OSError as exc:
                raise _write_error(self.root, exc) from None
            finally:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            self._models = {**self._models, model.name: model}
            self._sigs[model.name] = _signature(path)
        return model

    def delete(self, name):
        """Forget the model and remove its file; raise ModelNotFound if there is none."""
        path = self._path(name)
        self._sync(name)
        with self._lock:
            if name not in self._models:
                raise ModelNotFound(name)
            try:
                os.unlink(path)
                _fsync_dir(self.root)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _write_error(self.root, exc) from None
            self._models = {k: v for k, v in self._models.items() if k != name}
            self._sigs.pop(name, None)
