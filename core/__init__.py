"""core: what the API and the worker share.

Settings, database engine and sessions, ORM models, the job/step state machine, file storage
and the queue boundary. This package imports neither `api` nor `worker`, and never torch: the
API image has no torch, and the worker must not depend on the API's request schemas.
"""
