"""An OpenAI-compatible HTTP server (`/v1/chat/completions`, `/v1/models`, `/health`) and a web chat page.

    from mobilevlm.serve.app import ServerSettings, create_app
    app = create_app(pipeline, ServerSettings(model_name="mobilevlm"))

`mobilevlm serve --model DIR` runs it with uvicorn; docs/serving.md describes the API and its limits.
"""
