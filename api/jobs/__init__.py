"""/v1/fine_tuning/jobs: create (dpo or sdpo), list, retrieve, cancel, pause, resume, events,
checkpoints and steps."""
