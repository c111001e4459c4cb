"""The HTTP API: OpenAI's fine-tuning conventions, extended for sDPO.

Start it with `uvicorn api.main:create_app --factory`. It imports `core` and, for upload
validation and hyperparameter checks, `sdpo_engine.data` and `sdpo_engine.config` (pure Python);
never torch and never the worker: tasks are sent by name.
"""
