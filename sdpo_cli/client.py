"""`sdpo files|jobs|checkpoints …`: a command-line client of a running service, over HTTP only.

    sdpo files upload PATH                         upload (JSONL or Parquet) and validate; prints the report
    sdpo files list
    sdpo jobs create --model M --training-file F [--steps T --partition S …] [--spec job.yaml] [--watch]
    sdpo jobs list | get JOB | cancel JOB
    sdpo jobs watch JOB                            a progress bar per step and live metrics (SSE)
    sdpo checkpoints list JOB
    sdpo checkpoints download JOB [CHECKPOINT] [-o PATH] [--extract]

Where the server is and which key to use, first found wins: `--url`/`--api-key`; the environment
(`SDPO_URL`, `SDPO_API_KEY`); a config file (`--config`, `$SDPO_CONFIG`, or
`~/.config/sdpo/config.yaml`, with `url:` and `api_key:`); the service `sdpo up` started under
SDPO_HOME (its URL and admin key); else http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from sdpo_cli import local
from sdpo_cli.sdk import APIConnectionError, APIError, SDPOClient

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CONFIG = Path("~/.config/sdpo/config.yaml")
BAR_WIDTH = 24


class ClientError(Exception):
    """An error to print as one line (exit code 2)."""


# ------------------------------------------------------------------------------------------------
# Where and who


@dataclass
class Target:
    url: str
    api_key: str | None
    source: str


def _config_file(path: str | None) -> dict[str, Any]:
    candidate = Path(path or os.environ.get("SDPO_CONFIG") or DEFAULT_CONFIG).expanduser()
    if not candidate.is_file():
        if path:
            raise ClientError(f"config file {candidate} does not exist")
        return {}
    data = yaml.safe_load(candidate.read_text()) or {}
    if not isinstance(data, dict):
        raise ClientError(f"config file {candidate} must be a mapping with url: and api_key:")
    return data


def resolve_target(args: argparse.Namespace) -> Target:
    config = _config_file(getattr(args, "config", None))
    url = args.url or os.environ.get("SDPO_URL") or config.get("url")
    key = args.api_key or os.environ.get("SDPO_API_KEY") or config.get("api_key")
    source = "flags/environment/config"
    if url is None or key is None:
        # The service `sdpo up` started on this machine (its admin key is in SDPO_HOME).
        home = local.home()
        info = local.running_service(home)
        if info is not None:
            url = url or info["url"]
            key = key or local.admin_key(home)
            source = f"the service started by `sdpo up` in {home}"
    return Target(url=(url or DEFAULT_URL).rstrip("/"), api_key=key, source=source)


class Api:
    """The SDK's client for one target, its errors turned into `ClientError` lines (`with api:`)."""

    def __init__(self, target: Target, *, timeout: float = 60.0):
        self.target = target
        self.sdk = SDPOClient(target.url, target.api_key, timeout=timeout)

    def __enter__(self) -> SDPOClient:
        return self.sdk

    def __exit__(self, exc_type, exc, tb) -> None:
        self.sdk.close()
        if isinstance(exc, APIError):
            raise ClientError(error_text(exc)) from None


def error_text(exc: APIError) -> str:
    """One line for an API error (two or more for a refused file: its first 20 bad lines or rows)."""
    if isinstance(exc, APIConnectionError):
        return f"{exc.message}; start it with `sdpo up` or set SDPO_URL"
    if exc.body is None:
        return exc.message
    text = f"{exc.message} ({exc.status_code} {exc.code})"
    unit = "row" if exc.body.get("file_type") == "parquet" else "line"
    for problem in (exc.body.get("errors") or [])[:20]:
        text += f"\n  {unit} {problem.get('line')}: {problem.get('field') or '-'}: {problem.get('reason')}"
    return text


def _print_json(data: Any, out: TextIO | None = None) -> None:
    # The stream is read at call time (here and below): a default bound at import would keep a replaced
    # sys.stdout (pytest's capture, a redirect) that may be closed since.
    print(json.dumps(data, indent=2, ensure_ascii=False), file=out or sys.stdout)


# ------------------------------------------------------------------------------------------------
# files


def upload_file(client: SDPOClient, path: Path) -> dict[str, Any]:
    """Upload a JSONL or Parquet preference file (the server tells them apart by their bytes)."""
    if not path.is_file():
        raise ClientError(f"{path} is not a file")
    return client.files.create(path)


def print_warnings(file: dict[str, Any], out: TextIO | None = None) -> None:
    """The validation report's warnings, one per line with its sample line (Parquet: row) numbers.
    `out`: default the current sys.stderr (looked up per call, not bound at import)."""
    out = out or sys.stderr
    unit = "rows" if file.get("file_type") == "parquet" else "lines"
    for warning in file.get("warnings") or []:
        more = "…" if warning["count"] > len(warning["lines"]) else ""
        where = f" ({unit} {', '.join(map(str, warning['lines']))}{more})" if warning["lines"] else ""
        print(f"warning {warning['code']}: {warning['message']}{where}", file=out)


def _files_upload(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        file = upload_file(client, Path(args.path))
    if args.json:
        _print_json(file)
        return 0
    stats = file.get("stats") or {}
    sources = ", ".join(f"{k}: {v}" for k, v in (stats.get("sources") or {}).items()) or "-"
    print(file["id"])
    print(f"valid {file['format']} {file.get('file_type', 'jsonl')} file: {file['rows']} pairs, {file['bytes']} bytes; "
          f"sources {sources}; duplicates {stats.get('duplicates', '-')}; "
          f"{len(file.get('warnings') or [])} warning(s)", file=sys.stderr)
    print_warnings(file)
    return 0


def _files_list(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        files = client.files.list()["data"]
    if args.json:
        _print_json(files)
        return 0
    for f in files:
        print(f"{f['id']}\t{f['rows']:>6} pairs\t{f['format']}\t{f['filename']}")
    return 0


# ------------------------------------------------------------------------------------------------
# jobs


def _file_ref(client: SDPOClient, value: str | None) -> str | None:
    """A file id as is; a path on this machine is uploaded first."""
    if value is None or value.startswith("file-"):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ClientError(f"{value} is neither a file id (file-…) nor a file on this machine")
    file = upload_file(client, path)
    print(f"uploaded {path.name}: {file['id']} ({file['rows']} pairs)", file=sys.stderr)
    print_warnings(file)
    return file["id"]


def build_job_body(args: argparse.Namespace, client: SDPOClient) -> dict[str, Any]:
    """The POST /v1/fine_tuning/jobs body: the spec file (YAML or JSON, the API's shape) with the
    flags on top. Training and validation files may be paths; they are uploaded."""
    body: dict[str, Any] = {}
    if args.spec:
        spec_path = Path(args.spec)
        if not spec_path.is_file():
            raise ClientError(f"spec file {spec_path} does not exist")
        loaded = yaml.safe_load(spec_path.read_text())  # YAML is a superset of JSON
        if not isinstance(loaded, dict):
            raise ClientError(f"{spec_path} must hold one job object")
        body.update(loaded)
    for flag, field in (("model", "model"), ("training_file", "training_file"),
                        ("validation_file", "validation_file"), ("suffix", "suffix"), ("seed", "seed")):
        value = getattr(args, flag)
        if value is not None:
            body[field] = value
    hyper = {name: getattr(args, name) for name in ("n_epochs", "beta", "learning_rate_multiplier", "batch_size",
                                                     "learning_rate", "max_length")
             if getattr(args, name) is not None}
    method_type = args.method or (body.get("method") or {}).get("type") or ("sdpo" if args.steps else "dpo")
    method = dict(body.get("method") or {"type": method_type})
    method["type"] = method_type
    inner = dict(method.get(method_type) or {})
    if hyper:
        inner["hyperparameters"] = {**(inner.get("hyperparameters") or {}), **hyper}
    if method_type == "sdpo" and args.steps:
        inner["partition"] = {**(inner.get("partition") or {}), "strategy": args.partition or "random",
                              "n_steps": args.steps}
    method[method_type] = inner
    body["method"] = method
    if not body.get("model"):
        raise ClientError("a job needs --model (or `model:` in --spec)")
    body["training_file"] = _file_ref(client, body.get("training_file"))
    body["validation_file"] = _file_ref(client, body.get("validation_file"))
    for step in (method.get("sdpo") or {}).get("steps") or []:
        if isinstance(step, dict):
            step["training_file"] = _file_ref(client, step.get("training_file"))
    return {k: v for k, v in body.items() if v is not None}


def _jobs_create(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        body = build_job_body(args, client)
        job = client.jobs.create(model=body.pop("model"), idempotency_key=args.idempotency_key, extra_body=body)
        if args.json and not args.watch:
            _print_json(job)
            return 0
        print(job["id"])
        print(f"created {job['id']}: {job['method']['type']} with {job['n_steps']} step(s) on {job['model']} "
              f"({job['status']})", file=sys.stderr)
        if args.watch:
            return watch_job(client, job["id"], out=sys.stderr)
    return 0


def _job_line(job: dict[str, Any]) -> str:
    p = job.get("progress") or {}
    where = f"step {p.get('step', job.get('current_step'))}/{job['n_steps']}"
    if p.get("queue_position"):
        where = f"queue #{p['queue_position']}"
    return (f"{job['id']}\t{job['status']:<10}\t{where:<12}\t{p.get('percent', 0):5.1f}%\t{job['model']}\t"
            f"{job.get('fine_tuned_model') or ''}")


def _jobs_list(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        jobs = client.jobs.list(limit=args.limit)["data"]
    if args.json:
        _print_json(jobs)
        return 0
    for job in jobs:
        print(_job_line(job))
    return 0


def _jobs_get(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        job = client.jobs.retrieve(args.job_id)
        if args.json:
            _print_json(job)
        else:
            print(_job_line(job))
            steps = client.jobs.steps(args.job_id)["data"]
            print_lineage(job, steps)
            print_gate(job, steps)
    return 0


def _jobs_cancel(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        job = client.jobs.cancel(args.job_id)
    print(f"{job['id']} {job['status']}")
    return 0


def _jobs_watch(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        return watch_job(client, args.job_id, out=sys.stdout)


# ------------------------------------------------------------------------------------------------
# watching: server-sent events, one progress bar per step


class ProgressView:
    """One progress bar per sDPO step with its latest metrics; plain lines when not on a terminal."""

    def __init__(self, out: TextIO):
        self.out = out
        self.tty = out.isatty()
        self.step: int | None = None
        self.line = ""
        self.printed = ""

    def _bar(self, done: int, total: int) -> str:
        filled = int(BAR_WIDTH * done / total) if total else 0
        return "#" * filled + "-" * (BAR_WIDTH - filled)

    def metrics(self, data: dict[str, Any], n_steps: int | None) -> None:
        step, gs, ms = data.get("step"), data.get("global_step") or 0, data.get("max_steps") or 0
        if step != self.step:
            self.finish_bar()
            self.step = step
        parts = [f"step {step}/{n_steps or '?'} [{self._bar(gs, ms)}] {gs}/{ms}"]
        for label, key, spec in (("loss", "loss", ".4f"), ("acc", "rewards/accuracies", ".2f"),
                                 ("margin", "rewards/margins", ".3f")):
            if data.get(key) is not None:
                parts.append(f"{label} {format(data[key], spec)}")
        if data.get("tokens_per_second"):
            parts.append(f"{data['tokens_per_second']:.0f} tok/s")
        self.line = "  ".join(parts)
        if self.tty:
            self.out.write("\r\x1b[2K" + self.line)
            self.out.flush()
        elif self.line != self.printed:
            print(self.line, file=self.out, flush=True)
            self.printed = self.line

    def finish_bar(self) -> None:
        if self.tty and self.line:
            self.out.write("\n")
            self.out.flush()
        self.line = ""

    def message(self, text: str) -> None:
        if self.tty and self.line:
            self.out.write("\r\x1b[2K")
        print(text, file=self.out, flush=True)
        if self.tty and self.line:
            self.out.write(self.line)
            self.out.flush()


def print_lineage(job: dict[str, Any], steps: list[dict[str, Any]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    chain = [job["model"]] + [s.get("output_checkpoint") or f"(step {s['index']} {s['status']})" for s in steps]
    print("lineage: " + " -> ".join(chain), file=out)
    print(f"{'step':>4}  {'status':<10} {'reference':<31} {'output':<31} {'first_loss':>10} {'gamma_ref':>9} "
          f"{'last_loss':>9} {'rew_acc':>7} {'margin':>7}", file=out)
    for s in steps:
        m = s.get("metrics") or {}
        print(f"{s['index']:>4}  {s['status']:<10} {str(s.get('reference_checkpoint') or job['model']):<31} "
              f"{str(s.get('output_checkpoint') or '-'):<31} {_num(m.get('first_loss')):>10} "
              f"{_num(m.get('mean_gamma_ref'), '.3f'):>9} {_num(m.get('last_loss')):>9} "
              f"{_num(m.get('reward_accuracy'), '.3f'):>7} {_num(m.get('reward_margin'), '.3f'):>7}", file=out)


def _number(value: Any) -> float | None:
    """`value` as a float where it is a JSON number (not a bool), else None."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _num(value: Any, spec: str = ".4f") -> str:
    number = _number(value)
    return "-" if number is None else format(number, spec)


def _gate_metric(metrics: dict[str, Any] | None, metric: str) -> float | None:
    """A step's value of the gate's `metric` ("eval.<key>": its held-out metrics against the base)."""
    section, _, key = metric.partition(".")
    return _number(((metrics or {}).get(section) or {}).get(key))


def print_gate(job: dict[str, Any], steps: list[dict[str, Any]], out: TextIO | None = None) -> None:
    """A gated sDPO job's gate (`method.sdpo.gate`) and its outcome per step; nothing for a job without one.

    Per step: `passed` for a succeeded step that did not end the job (the server checks the gate in every
    step's "succeeded" transaction, core/jobs/gates.py), `failed (reason)` for the job's `gate.failed_step`,
    `-` for a step that did not succeed. Its value of the gate's metric, the delta the gate compares with
    `min_delta` (step 1 against the base: 0 for the reward metrics, `drift.base_preference_accuracy` for
    preference accuracy) and `drift.max_abs_per_token` (nats per token, against `max_drift`). The failed
    step's numbers are the server's own (`job.gate`), then what the job's result is."""
    out = out or sys.stdout
    gate = ((job.get("method") or {}).get("sdpo") or {}).get("gate")
    if not isinstance(gate, dict):
        return
    metric = gate.get("metric") or "-"
    outcome = job.get("gate") or {}
    failed = outcome.get("failed_step") if outcome.get("status") == "failed" else None
    status = outcome.get("status") or "no outcome yet (checked after each step)"
    if outcome.get("status") == "passed":
        status += f" ({outcome.get('steps_checked')} steps checked)"
    print(f"gate: {metric}, min_delta {_num(gate.get('min_delta'))}, max_drift {_num(gate.get('max_drift'))}, "
          f"on_fail {gate.get('on_fail', 'stop')}: {status}", file=out)
    print(f"{'step':>4}  {'gate':<20} {'value':>9} {'delta':>9} {'drift':>9}", file=out)
    previous: float | None = None
    for s in steps:
        m = s.get("metrics") or {}
        value = _gate_metric(m, metric)
        if s["index"] == 1:
            base = ((m.get("drift") or {}).get("base_preference_accuracy") if metric == "eval.preference_accuracy"
                    else 0.0)
            previous = _number(base)
        drift = (m.get("drift") or {}).get("max_abs_per_token")
        delta = value - previous if value is not None and previous is not None else None
        if s["index"] == failed:
            verdict = f"failed ({outcome.get('reason')})"
            value, delta, drift = outcome.get("value"), outcome.get("delta"), outcome.get("drift")
        elif s["status"] == "succeeded":
            verdict = "passed"
        else:
            verdict = f"- ({s['status']})"
        print(f"{s['index']:>4}  {verdict:<20} {_num(value):>9} {_num(delta, '+.4f'):>9} {_num(drift):>9}", file=out)
        previous = _gate_metric(m, metric)
    if failed is not None:
        then = ("rolled back to" if outcome.get("rolled_back") else "stopped; the result is")
        print(f"gate failed after step {failed}: {then} step {outcome.get('result_step')} "
              f"({outcome.get('result_checkpoint')}), {outcome.get('fine_tuned_model') or '-'}", file=out)


def watch_job(client: SDPOClient, job_id: str, *, out: TextIO | None = None) -> int:
    """Follow a job to its end (server-sent events). Exit code 0 when it succeeded, 1 otherwise.
    `out`: default the current sys.stdout (looked up per call, not bound at import)."""
    out = out or sys.stdout
    job = client.jobs.retrieve(job_id)
    view = ProgressView(out)
    for data in client.jobs.stream_events(job_id):
        if data.get("type") == "metrics":
            view.metrics(data.get("data") or {}, job["n_steps"])
        else:
            level = data.get("level")
            prefix = "!" if level in ("warn", "error") else "-"
            view.message(f"{prefix} {data.get('message')}")
    view.finish_bar()
    job = client.jobs.retrieve(job_id)
    steps = client.jobs.steps(job_id)["data"]
    print("", file=out)
    print_lineage(job, steps, out=out)
    print_gate(job, steps, out=out)
    print(f"\njob {job['id']} {job['status']}" + (f": {job['fine_tuned_model']}" if job.get("fine_tuned_model") else "")
          + (f" ({job['error']['message']})" if job.get("error") else ""), file=out)
    return 0 if job["status"] == "succeeded" else 1


# ------------------------------------------------------------------------------------------------
# checkpoints


def _checkpoints_list(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        data = client.jobs.checkpoints(args.job_id, limit=100)["data"]
    if args.json:
        _print_json(data)
        return 0
    for c in data:
        m = c.get("metrics") or {}
        print(f"{c['id']}\tstep {c['step_index']}\t{c.get('bytes') or 0:>12} bytes\tlast loss {m.get('last_loss')}")
    return 0


def _checkpoints_download(args: argparse.Namespace) -> int:
    with Api(resolve_target(args)) as client:
        checkpoint_id = args.checkpoint_id
        if checkpoint_id is None:  # the final one: the latest step's
            data = client.jobs.checkpoints(args.job_id, limit=1)["data"]
            if not data:
                raise ClientError(f"job {args.job_id} has no checkpoint yet")
            checkpoint_id = data[0]["id"]
        target = Path(args.output or (checkpoint_id if args.extract else f"{checkpoint_id}.tar"))
        try:
            size = client.checkpoints.download(args.job_id, checkpoint_id, target, extract=args.extract)
        except FileExistsError:
            raise ClientError(f"{target} already exists") from None
    print(str(target))
    print(f"downloaded {checkpoint_id}: {size} bytes", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------
# The parsers


def _guard(handler):
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ClientError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130

    return run


def _connection() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="the service (default: SDPO_URL, the config file, or `sdpo up`'s)")
    common.add_argument("--api-key", help="an API key (default: SDPO_API_KEY or the config file)")
    common.add_argument("--config", help="a YAML file with url: and api_key: (default ~/.config/sdpo/config.yaml)")
    common.add_argument("--json", action="store_true", help="print the API's JSON")
    return common


def register_client(commands: argparse._SubParsersAction) -> None:
    common = _connection()

    files = commands.add_parser("files", help="upload and list preference files")
    sub = files.add_subparsers(dest="files_command", required=True)
    p = sub.add_parser("upload", parents=[common],
                       help="upload a JSONL or Parquet file; prints its id, and its validation report and warnings "
                            "on stderr")
    p.add_argument("path")
    p.set_defaults(handler=_guard(_files_upload))
    sub.add_parser("list", parents=[common], help="list your files").set_defaults(handler=_guard(_files_list))

    jobs = commands.add_parser("jobs", help="create, follow, list and cancel fine-tuning jobs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True)
    p = sub.add_parser("create", parents=[common], help="create a job from flags or a YAML/JSON spec")
    p.add_argument("--spec", help="a YAML or JSON file with the job body (the API's shape); flags override it")
    p.add_argument("--model")
    p.add_argument("--training-file", help="a file id, or a local path (uploaded first)")
    p.add_argument("--validation-file", help="a file id, or a local path (uploaded first)")
    p.add_argument("--method", choices=["dpo", "sdpo"], help="default: sdpo with --steps, else dpo")
    p.add_argument("--steps", type=int, help="sDPO: split the training file into this many steps")
    p.add_argument("--partition", choices=["random", "stratified", "easy_to_hard", "hard_to_easy"],
                   help="how to split it (default random)")
    p.add_argument("--epochs", type=int, dest="n_epochs")
    p.add_argument("--beta", type=float)
    p.add_argument("--learning-rate", type=float)
    p.add_argument("--learning-rate-multiplier", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--suffix")
    p.add_argument("--seed", type=int)
    p.add_argument("--idempotency-key")
    p.add_argument("--watch", action="store_true", help="then follow it like `sdpo jobs watch`")
    p.set_defaults(handler=_guard(_jobs_create))
    p = sub.add_parser("list", parents=[common], help="your jobs, newest first, with progress")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(handler=_guard(_jobs_list))
    for name, handler, text in (("get", _jobs_get, "one job, its lineage and per-step metrics"),
                                ("watch", _jobs_watch, "follow a job live: a progress bar per step, metrics"),
                                ("cancel", _jobs_cancel, "cancel a job")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("job_id")
        p.set_defaults(handler=_guard(handler))

    checkpoints = commands.add_parser("checkpoints", help="list and download a job's checkpoints")
    sub = checkpoints.add_subparsers(dest="checkpoints_command", required=True)
    p = sub.add_parser("list", parents=[common], help="a job's checkpoints, one per finished step")
    p.add_argument("job_id")
    p.set_defaults(handler=_guard(_checkpoints_list))
    p = sub.add_parser("download", parents=[common], help="download a checkpoint (default: the final one)")
    p.add_argument("job_id")
    p.add_argument("checkpoint_id", nargs="?")
    p.add_argument("-o", "--output", help="a .tar file, or with --extract a directory (default: the checkpoint id)")
    p.add_argument("--extract", action="store_true", help="unpack into a directory instead of keeping the tar")
    p.set_defaults(handler=_guard(_checkpoints_download))
