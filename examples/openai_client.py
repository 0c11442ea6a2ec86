"""An app on the OpenAI client that talks to a local `lutengine serve`.

    pip install 'lutengine[serve]' openai
    lutengine serve --parallel 4 &          # loopback, port 8080
    python examples/openai_client.py "Why is the sky blue?"

The same code runs against any OpenAI-compatible server: only base_url changes.
"""
import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from openai import OpenAI


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("question", nargs="?", default="Name three uses of a lookup table.")
    p.add_argument("--url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default="none", help="what `lutengine serve --api-key` was given")
    p.add_argument("--max-tokens", type=int, default=128)
    args = p.parse_args()
    client = OpenAI(base_url=args.url, api_key=args.api_key)
    model = client.models.list().data[0].id

    # One streamed answer, printed as it arrives.
    stream = client.chat.completions.create(model=model, max_tokens=args.max_tokens, stream=True,
                                            messages=[{"role": "user", "content": args.question}])
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()

    # Several questions at once: the server decodes them together, one batched step for all.
    topics = ["rivers", "mountains", "deserts", "forests"]
    def one_line(topic):
        r = client.chat.completions.create(model=model, max_tokens=32, temperature=0,
                                           messages=[{"role": "user", "content": f"One sentence about {topic}."}])
        return f"{topic}: {r.choices[0].message.content.strip()} ({r.usage.completion_tokens} tokens)"
    with ThreadPoolExecutor(len(topics)) as pool:
        for line in pool.map(one_line, topics):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
