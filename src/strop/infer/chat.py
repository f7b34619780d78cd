"""`strop chat`: talk to a model in the terminal, one line per turn.

Reads stdin line by line, so it can be scripted (`printf 'hi\\n/exit\\n' | strop chat run/`).
`/reset` forgets the conversation, `/exit` (or end of input) ends it. Replies stream as they
are generated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import IO

from strop.infer.generate import Sampling, stream
from strop.infer.load import Loaded
from strop.infer.prompts import Prompter

HELP = "type a message; /reset clears the conversation, /exit (or Ctrl-D) quits"


def chat_loop(loaded: Loaded, sampling: Sampling, system: str | None = None,
              stdin: IO[str] | None = None, write: Callable[[str], None] | None = None) -> int:
    """Run the conversation until /exit or end of input; returns the number of replies."""
    stdin = stdin or sys.stdin
    write = write or _write
    prompter = Prompter(loaded.cfg, loaded.tokenizer)
    interactive = stdin.isatty()
    style = {"format": f"the run's {prompter.format_name} prompt format",
             "template": "the tokenizer's chat template", "plain": "plain text"}
    write(f"chatting with {loaded.description} ({style[prompter.chat_style]}); {HELP}\n")
    history: list[dict[str, str]] = []
    replies = 0
    while True:
        if interactive:
            write("you> ")
        line = stdin.readline()
        if not line:  # end of input
            break
        message = line.rstrip("\n")
        command = message.strip()
        if command == "/exit":
            break
        if command == "/reset":
            history.clear()
            write("(conversation cleared)\n")
            continue
        if not command:
            continue
        if not interactive:
            write(f"you> {message}\n")
        history.append({"role": "user", "content": message})
        write("model> ")
        reply = stream(loaded.model, loaded.tokenizer, prompter.chat(history, system), sampling,
                       write)
        write("\n")
        history.append({"role": "assistant", "content": reply.text})
        replies += 1
    write("bye\n")
    return replies


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
