"""``python -m client``: operator commands of the SDK.

``python -m client import-onnx MODEL.onnx --name NAME --target HOST:PORT`` registers an ONNX model (a chain of
convolutions, see `client.onnx_layers`) and prints it as ``get_model`` describes it, as JSON. Exit status: 0 on
success, 1 when the model is refused or the call fails (the reason on stderr), 2 for a bad command line.
The load-test harness is ``python -m client.loadtest``.
"""
import argparse
import json
import sys

from ._client import ConvClient
from ._errors import ConvError


def _parser():
    parser = argparse.ArgumentParser(prog="python -m client", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    imp = commands.add_parser("import-onnx", help="register an ONNX model and print it as get_model describes it",
                              description="Register an ONNX model that is a chain of convolutions (each optionally "
                                          "followed by BatchNormalization and an activation); print the registered "
                                          "model as JSON.")
    imp.add_argument("model", metavar="MODEL.onnx", help="the ONNX file (external data next to it is read)")
    imp.add_argument("--name", required=True, help="the name to register it under")
    imp.add_argument("--target", default="localhost:50051",
                     help="server(s): HOST:PORT, HOST:PORT,HOST:PORT or dns:///NAME:PORT (default %(default)s)")
    imp.add_argument("--timeout", type=float, default=60.0, help="deadline of the call in seconds (default %(default)s)")
    imp.add_argument("--token", help="bearer token for a server started with --auth-token")
    imp.add_argument("--root-certificates", metavar="PEM", help="connect with TLS, trusting these roots")
    return parser


def main(argv=None):
    """Run the command line `argv` (default: sys.argv[1:]); return the exit status."""
    args = _parser().parse_args(argv)
    try:
        with ConvClient(args.target, timeout=args.timeout, token=args.token,
                        root_certificates=args.root_certificates) as client:
            info = client.register_onnx(args.name, args.model)
    except ConvError as err:
        print(f"python -m client import-onnx: {err}", file=sys.stderr)
        return 1
    json.dump(info, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
