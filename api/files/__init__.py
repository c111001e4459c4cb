"""/v1/files: upload (streamed and validated), list, retrieve, content, delete."""
