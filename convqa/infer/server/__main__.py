"""`python -m convqa.infer.server`: serve one artifact (see convqa.infer.server.app)."""

from convqa.infer.server.app import main

main()
