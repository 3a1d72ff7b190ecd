"""``batchpilot serve`` — the planner in a browser: a local web app over the same library functions as the CLI.

Examples::

    batchpilot serve                      # http://127.0.0.1:8765 (localhost only)
    batchpilot serve --port 9000 --runs runs/
    curl 'http://127.0.0.1:8765/api/plan?model=llama-3-8b&gpu=h100-sxm&gpus=64&seq-len=8192&global-batch-tokens=4Mi'

The JSON API answers what ``batchpilot plan … --json`` prints for the same flags (:mod:`batchpilot.serve.app`);
the page (``static/``, shipped in the package, nothing from a CDN) shows the plan table, the winner's memory
and step-time breakdowns, the rejected layouts, the fixes when nothing fits, and the exports to download.
Needs the optional extra ``serve`` (Starlette and uvicorn): ``pip install 'batchpilot[serve]'``.
"""
