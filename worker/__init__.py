"""The Celery worker: prepares jobs, runs each sDPO step in a supervised child process, finalises."""
