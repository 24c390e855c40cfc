"""``llm-modules serve RUN``: the OpenAI-compatible server and the side-by-side page."""

from __future__ import annotations

import argparse
import ipaddress
import sys

import torch

from ..errors import LLMModulesError
from ..model.onednn import CPU_LINEAR_HELP, CPU_LINEARS
from .batching import BatchLimits
from .server import ServerLimits


def build_parser() -> argparse.ArgumentParser:
    defaults, batch = ServerLimits(), BatchLimits()
    parser = argparse.ArgumentParser(
        prog="llm-modules serve",
        description="Serve a saved composed model behind OpenAI's API (/v1/chat/completions, /v1/completions, "
                    "/v1/models) with a side-by-side page at /.",
    )
    parser.add_argument("run", help="folder written by save_pretrained() / llm-modules train")
    parser.add_argument("--compare", default="", metavar="source,target",
                        help="also serve the composed model's source and/or target alone (the page's other columns)")
    parser.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1: this machine only")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model-name", default=None, help="the composed model's id in the API (default: RUN's name)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--defer-threshold", type=float, default=None, metavar="ETA",
                        help="deferral decoding: the source runs only where the gate's source weight >= ETA "
                             "(default: the saved model's own, if any; model/deferral.py)")
    parser.add_argument("--cpu-linear", choices=CPU_LINEARS, default="torch", help=CPU_LINEAR_HELP)
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-tokens", type=int, default=defaults.max_tokens, help="largest max_tokens a request may ask")
    limits.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens)
    limits.add_argument("--max-model-len", type=int, default=None, help="cap on prompt + completion tokens")
    limits.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    limits.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds per request, queue wait included")
    limits.add_argument("--max-batch-size", type=int, default=batch.max_batch_size)
    limits.add_argument("--max-batch-tokens", type=int, default=batch.max_batch_tokens,
                        help="sum of prompt + max_tokens over a batch's rows")
    limits.add_argument("--max-queue", type=int, default=batch.max_queue, help="waiting sequences per model; then 429")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return parser


def serve_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for name in ("max_tokens", "default_max_tokens", "max_body_bytes", "max_batch_size", "max_batch_tokens", "max_queue"):
        if getattr(args, name) < 1:
            raise LLMModulesError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.request_timeout <= 0:
        raise LLMModulesError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise LLMModulesError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    compare = [part.strip() for part in args.compare.split(",") if part.strip()]

    import uvicorn

    from .models import load_served_models
    from .server import create_app

    limits = ServerLimits(
        max_tokens=args.max_tokens, default_max_tokens=min(args.default_max_tokens, args.max_tokens),
        max_body_bytes=args.max_body_bytes, request_timeout_s=args.request_timeout,
        batch=BatchLimits(max_batch_size=args.max_batch_size, max_batch_tokens=args.max_batch_tokens,
                          max_queue=args.max_queue),
    )
    models = load_served_models(args.run, compare, args.device, args.model_name, args.max_model_len,
                                args.defer_threshold, args.cpu_linear)
    if not _is_loopback(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can use the model "
              "(there is no authentication; put a proxy in front to add one)", file=sys.stderr)
    for model in models:
        print(f"serving {model.role:>8}: {model.id} (context {model.context_length} tokens)"
              f"{'; ' + model.note if model.note else ''}", file=sys.stderr)
    print(f"page: http://{args.host}:{args.port}/   API: http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(create_app(models, limits), host=args.host, port=args.port, log_level=args.log_level)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
