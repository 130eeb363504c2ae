"""An OpenAI-compatible HTTP server for one artifact (`app`), and a supervisor that keeps servers
contained (`supervisor`).

`python -m convqa.infer.server ARTIFACT --tokenizer DIR` runs the app (`app.main`).
"""

HOST = "127.0.0.1"
DEFAULT_MAX_CONTEXT = 2048
