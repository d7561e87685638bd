"""A stand-in for ``python -m llama_cpp.server``: takes its flags and answers as compeff's fake server.

``teacher.serve.engine=llamacpp`` starts ``python -m llama_cpp.server --model ... --port P ...``; with
``tests/engines`` on PYTHONPATH that runs this file, a real process on a real loopback port that answers
at once, so the serving tests do not need llama.cpp built. Flags of its own (pass them through
``teacher.serve.extra_args``): ``--api_key K`` or ``--api-key K`` (every route then wants ``Bearer K``) and
``--start_delay_s S`` (wait before listening, like a model still loading).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from compeff.teachers.fake_server import make_app


def main() -> None:
    """Parse llama-cpp-python's flags that matter here, then serve until killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--api_key", "--api-key", dest="api_key", default=None)  # llama.cpp's, vLLM's
    parser.add_argument("--start_delay_s", type=float, default=0.0)
    args, _ = parser.parse_known_args()
    time.sleep(args.start_delay_s)
    app = make_app(0.0)

    @web.middleware
    async def check_key(request: web.Request, handler):
        if args.api_key and request.headers.get("Authorization") != f"Bearer {args.api_key}":
            return web.json_response({"detail": "Invalid API Key"}, status=401)
        return await handler(request)

    app.middlewares.append(check_key)

    async def serve() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, args.host, args.port).start()
        print(f"stub llama_cpp.server on {args.host}:{args.port}", flush=True)
        while True:
            await asyncio.sleep(3600)

    asyncio.run(serve())


if __name__ == "__main__":
    main()
