"""`mtplab serve`: an OpenAI-compatible HTTP API and a chat page for one checkpoint.

    from mtplab.serve import create_app
    app = create_app(model, tokenizer, model_name="demo")   # a FastAPI app; run it with uvicorn
"""

from .app import create_app

__all__ = ["create_app"]
