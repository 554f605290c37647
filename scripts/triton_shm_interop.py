"""Triton's own client through system shared memory: tritonclient.utils.shared_memory + tritonclient.grpc, unmodified.

Run it with the Triton virtualenv's interpreter (scripts/triton_venv.sh), never in our own environment:

    .venv-triton/bin/python scripts/triton_shm_interop.py HOST:PORT MODEL INPUT.npy OUTPUT.npy

It creates one region for the input and one for the output, registers both, infers with both in shared memory,
reads the output out of its region, saves it to OUTPUT.npy, unregisters and destroys the regions, and prints one
JSON object (the regions the server listed while registered, and the statistics of the model afterwards).
"""
import json
import sys

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm


def main(target, model, input_path, output_path):
    x = np.load(input_path)
    client = grpcclient.InferenceServerClient(url=target)
    meta = client.get_model_metadata(model, as_json=True)
    out_channels = int(meta["outputs"][0]["shape"][1])
    out_bytes = x.shape[0] * out_channels * x.shape[2] * x.shape[3] * x.itemsize  # "same" padding: same H, W
    client.unregister_system_shared_memory()
    hin = shm.create_shared_memory_region("in_data", "/triton_in_test", x.nbytes)
    hout = shm.create_shared_memory_region("out_data", "/triton_out_test", out_bytes)
    try:
        shm.set_shared_memory_region(hin, [x])
        client.register_system_shared_memory("in_data", "/triton_in_test", x.nbytes)
        client.register_system_shared_memory("out_data", "/triton_out_test", out_bytes)
        status = client.get_system_shared_memory_status(as_json=True)
        inp = grpcclient.InferInput("input", list(x.shape), "FP32")
        inp.set_shared_memory("in_data", x.nbytes)
        out = grpcclient.InferRequestedOutput("output")
        out.set_shared_memory("out_data", out_bytes)
        result = client.infer(model, [inp], outputs=[out])
        output = result.get_output("output")
        shape = [int(d) for d in output.shape]
        y = shm.get_contents_as_numpy(hout, np.float32, shape)
        np.save(output_path, y)
        client.unregister_system_shared_memory("in_data")
        client.unregister_system_shared_memory("out_data")
        after = client.get_system_shared_memory_status(as_json=True)
        stats = client.get_inference_statistics(model, as_json=True)
    finally:
        shm.destroy_shared_memory_region(hin)
        shm.destroy_shared_memory_region(hout)
    print(json.dumps({"status": status, "after": after, "shape": shape, "statistics": stats}))
    client.close()


if __name__ == "__main__":
    main(*sys.argv[1:5])
