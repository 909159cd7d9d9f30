"""`recstack triton export|serve`: the Triton model repository and a local server."""

from __future__ import annotations

import argparse
import json
import signal
from pathlib import Path


def add_commands(commands: argparse._SubParsersAction) -> None:
    triton = commands.add_parser("triton", help="export a Triton model repository and serve it locally")
    triton_commands = triton.add_subparsers(title="triton commands", required=True)

    export = triton_commands.add_parser("export", help="write a model repository from exported models")
    export.add_argument("--models", required=True, type=Path, help="directory written by the model export")
    export.add_argument("--out", required=True, type=Path, help="repository directory to create")
    export.add_argument("--gpu", action="store_true", help="run the models on GPUs (KIND_GPU instance groups)")
    export.set_defaults(run=_export)

    serve = triton_commands.add_parser("serve", help="serve a copy of a repository's Python-backend models until "
                                       "stopped (nothing is written into the repository)")
    serve.add_argument("--repo", required=True, type=Path, help="model repository")
    serve.add_argument("--http-port", type=int, default=8000)
    serve.add_argument("--grpc-port", type=int, default=8001)
    serve.set_defaults(run=_serve)


def _export(args: argparse.Namespace) -> int:
    from inference.triton.repository import RepositoryConfig, write_repository

    print(json.dumps(write_repository(args.models, args.out, RepositoryConfig(gpu=args.gpu))))
    return 0


def _serve(args: argparse.Namespace) -> int:
    from inference.triton.server import TritonServer
    from recstack.cli import print_error  # here, not at the top: recstack.cli imports this module

    server = TritonServer(args.repo, args.http_port, args.grpc_port, copy=True)  # e.g. a published version's
    signal.signal(signal.SIGTERM, _interrupt)  # a service manager's stop is handled like Ctrl-C
    try:
        server.start()
        print(f"serving {', '.join(server.models)} from {args.repo}: HTTP {server.http_url}, "
              f"gRPC {server.grpc_url}", flush=True)
        code = server.process.wait()
        print_error(f"tritonserver exited with code {code}; log tail:\n{server.log_tail()}")
        return 1
    except RuntimeError as error:
        print_error(error)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        server.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
