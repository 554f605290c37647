"""Talk to our server with Triton's own Python client (tritonclient[grpc]==2.41.0), unmodified.

Run it with the interpreter of the Triton virtualenv (scripts/triton_venv.sh), never in our own environment:
tritonclient registers its own `inference.*` protobuf messages, which clash with ours in one process.

    .venv-triton/bin/python scripts/triton_interop.py HOST:PORT MODEL INPUT.npy OUTPUT.npy

Prints one JSON object: liveness, readiness, the model's metadata and config, and the output's dtype and shape; the
output array itself is saved to OUTPUT.npy.
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient


def main(target, model, input_path, output_path):
    x = np.load(input_path)
    client = grpcclient.InferenceServerClient(url=target)
    metadata = client.get_model_metadata(model, as_json=True)
    config = client.get_model_config(model, as_json=True)
    datatype = metadata["inputs"][0]["datatype"]
    inp = grpcclient.InferInput("input", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    result = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput("output")], request_id="req-42")
    y = result.as_numpy("output")
    np.save(output_path, y)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "server_metadata": client.get_server_metadata(as_json=True),
        "metadata": metadata,
        "config": config,
        "response_id": result.get_response().id,
        "output_dtype": str(y.dtype),
        "output_shape": list(y.shape),
    }
    # Without requested outputs the server must return all of them (here: the one).
    y_all = client.infer(model, [inp]).as_numpy("output")
    report["all_outputs_equal"] = bool(np.array_equal(y_all, y))
    try:
        client.get_model_metadata("no-such-model")
        report["unknown_model_error"] = None
    except grpcclient.InferenceServerException as exc:
        report["unknown_model_error"] = exc.status()
    print(json.dumps(report))
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
