#!/usr/bin/env python3
"""Checks `kiln serve` with the official `openai` Python client: models, completions, chat,
streaming (chunks add up to the whole answer), stop sequences and error mapping.

Either point it at a running server:
    /work/venv/bin/python tools/serve/openai_check.py --base-url http://127.0.0.1:8080/v1
or let it start one on a free port and stop it afterwards:
    /work/venv/bin/python tools/serve/openai_check.py --kiln target/release/kiln --ckpt runs/demo

Install: /work/venv/bin/pip install -r tools/serve/requirements.txt
Exits non-zero when a check fails; the last line reads "N passed, M failed".
"""

import argparse
import re
import subprocess
import sys

import openai


def start_server(kiln, ckpt, api_key):
    cmd = [kiln, "serve", "--ckpt", ckpt, "--port", "0"]
    if api_key:
        cmd += ["--api-key", api_key]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        m = re.search(r"listening on (http://\S+)", line)
        if m:
            return proc, m.group(1) + "/v1"
    proc.wait()
    sys.exit(f"kiln serve did not start: {proc.stderr.read()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", help="a running server's /v1 URL")
    ap.add_argument("--kiln", default="target/release/kiln", help="kiln binary (with --ckpt)")
    ap.add_argument("--ckpt", help="start `kiln serve` on this checkpoint")
    ap.add_argument("--api-key", default=None, help="API key (passed to the server it starts, too)")
    args = ap.parse_args()
    if not args.base_url and not args.ckpt:
        ap.error("give --base-url or --ckpt")

    proc = None
    base_url = args.base_url
    if args.ckpt:
        proc, base_url = start_server(args.kiln, args.ckpt, args.api_key)
    client = openai.OpenAI(base_url=base_url, api_key=args.api_key or "none", max_retries=0)
    results = []

    def check(name, cond, detail=""):
        results.append(bool(cond))
        print(f"{'ok  ' if cond else 'FAIL'} {name}{'' if cond else ': ' + str(detail)}")

    try:
        models = client.models.list().data
        check("models.list names one model", len(models) == 1, models)
        model = models[0].id

        prompt = "the cat sat on"
        c = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        text = c.choices[0].text
        check("completion has text and usage", c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0, c)
        check("finish_reason is stop or length", c.choices[0].finish_reason in ("stop", "length"), c)
        again = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0)
        check("greedy completion is deterministic", again.choices[0].text == text, (text, again.choices[0].text))

        chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        streamed = "".join(ch.choices[0].text for ch in chunks if ch.choices)
        check("streamed completion equals the whole one", streamed == text, (streamed, text))
        check("stream ends with a finish_reason", chunks[-1].choices[0].finish_reason is not None, chunks[-1])

        if len(text) > 6:
            stop = text[3:6]
            s = client.completions.create(model=model, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
            check("stop sequence cuts the text", s.choices[0].text == text[: text.find(stop)], (s.choices[0].text, stop))

        messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Say hello."}]
        chat = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
        reply = chat.choices[0].message.content
        check("chat reply from the assistant", chat.choices[0].message.role == "assistant" and reply is not None, chat)
        parts = list(
            client.chat.completions.create(
                model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
                stream_options={"include_usage": True},
            )
        )
        streamed = "".join((p.choices[0].delta.content or "") for p in parts if p.choices)
        check("streamed chat equals the whole reply", streamed == reply, (streamed, reply))
        check("stream_options.include_usage gives usage", parts[-1].usage is not None
              and parts[-1].usage.total_tokens == chat.usage.total_tokens, parts[-1])

        try:
            client.completions.create(model=model, prompt=prompt, max_tokens=10**9)
            check("huge max_tokens is refused", False, "no error")
        except openai.BadRequestError as e:
            check("huge max_tokens is refused with 400", e.status_code == 400, e)
        try:
            client.completions.create(model="no-such-model", prompt=prompt, max_tokens=5)
            check("unknown model is refused", False, "no error")
        except openai.NotFoundError as e:
            check("unknown model is refused with 404", e.status_code == 404, e)
        if args.api_key:
            bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
            try:
                bad.models.list()
                check("wrong API key is refused", False, "no error")
            except openai.AuthenticationError as e:
                check("wrong API key is refused with 401", e.status_code == 401, e)
    finally:
        if proc:
            proc.terminate()
            proc.wait()

    passed = sum(results)
    print(f"{passed} passed, {len(results) - passed} failed")
    sys.exit(0 if passed == len(results) else 1)


if __name__ == "__main__":
    main()
