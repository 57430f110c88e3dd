"""The command line: parse, build the job, call the API, map errors to exit codes.

Every job key is a flag named after it (``--max-tokens`` for ``max_tokens``),
generated from ``config.KEYS``; a flag given overrides the job file. The flags
of ``mock-server`` are generated the same way from ``MockConfig``'s fields. Heavy
modules (pyarrow, pandas, aiohttp) are imported inside the commands, so
``batchrun --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import click

from batchrun._version import __version__
from batchrun.config import KEYS, Key
from batchrun.errors import BatchrunError, Interrupted, Terminated, raise_terminated
from batchrun.mock.config import Flag as MockFlag
from batchrun.mock.config import MockConfig

EXIT_CODES = """\b
Exit codes:
  0  every row ok
  1  finished, but some rows failed
  2  bad job, flags or input (nothing sent)
  3  stopped early (key refused, every request failing alike, API down, too many failures, output in use by another run); rerun to resume
  4  stopped before passing max_cost; raise it and rerun to resume
  6  disk full (or quota) while journaling or writing the output; free space and rerun to resume
  130/143  stopped by Ctrl-C / SIGTERM; rerun to resume"""


CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
"""Of the batchrun group, and of ``python -m batchrun.mock``, which runs mock-server alone."""


def _parse_table(values: tuple[str, ...], flag: str) -> dict[str, Any] | None:
    """KEY=VALUE pairs → a table; each value is read as JSON, else kept as a string."""
    import orjson

    if not values:
        return None
    table: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=flag)
        try:
            table[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            table[key] = raw
    return table


def _key_option(key: Key) -> Callable[[Any], Any]:
    help_text = key.help + (
        f" [default: {key.default}]" if key.default not in (None, (), {}) else ""
    )
    if key.kind == "bool":
        return click.option(key.flag, key.name, is_flag=True, default=None, help=help_text)
    if key.kind == "table":
        flags = [key.flag, *([key.alias] if key.alias else [])]
        return click.option(
            *flags, key.name, multiple=True, metavar="KEY=VALUE", help=help_text + " Repeatable."
        )
    click_type: Any = {"int": int, "float": float}.get(key.kind, str)
    metavar = {
        "path": "PATH",
        "list": "A,B",
        "int": "N",
        "float": "X",
        "int_or_auto": "N|auto",
    }.get(key.kind, "TEXT")
    return click.option(
        key.flag, key.name, type=click_type, default=None, metavar=metavar, help=help_text
    )


def job_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for key in reversed(KEYS):
        func = _key_option(key)(func)
    return func


def _overrides(values: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in KEYS:
        value = values.get(key.name)
        if key.kind == "table":
            value = _parse_table(value or (), key.flag)
        out[key.name] = value
    return out


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    k, sep, n = text.partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit() or not 0 <= int(k) < int(n):
        raise click.BadParameter(
            f"{text!r} is not K/N with 0 <= K < N, e.g. 0/4", param_hint="--shard"
        )
    return int(k), int(n)


def flag(*names: str, help: str) -> Callable[[Any], Any]:
    """An on/off option."""
    return click.option(*names, is_flag=True, help=help)


def choice(*names: str, among: tuple[str, ...], help: str) -> Callable[[Any], Any]:
    """An option taking one of ``among``; the first is the default."""
    return click.option(
        *names, type=click.Choice(among), default=among[0], show_default=True, help=help
    )


def file_option(*names: str, help: str) -> Callable[[Any], Any]:
    """An option naming a file (not a folder)."""
    return click.option(*names, type=click.Path(dir_okay=False, path_type=Path), help=help)


SEND_OPTIONS = (
    flag(
        "--restart",
        help="Discard what an earlier run of this output left (an unfinished journal or the finished file) and start over.",
    ),
    flag(
        "--retry-failed",
        help="Send again the rows whose status is error (in the unfinished run, or in the finished output) and replace them.",
    ),
    flag("--skip-bad-lines", help="Skip (and count) JSONL lines that are not JSON objects."),
    flag("--dedupe", help="Keep the first row of each duplicate id instead of failing."),
    click.option(
        "--shard",
        metavar="K/N",
        default=None,
        help="Send only the rows whose id hashes to shard K of N (K from 0 to N-1); run N processes, each with its own --output, then batchrun merge.",
    ),
    click.option(
        "--reuse",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Copy the answer of any row whose exact request an earlier output (file or folder; repeatable) answered ok, instead of sending it.",
    ),
    flag(
        "--mock",
        help="Send to the embedded local endpoint instead of base_url (no key, no network).",
    ),
)
"""What decides which rows a run sends and where: run and plan take the same."""


def send_options(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(SEND_OPTIONS):
        func = option(func)
    return func


def _run_options(flags: dict[str, Any], **more: Any) -> Any:
    """The RunOptions of the send options in ``flags`` (and ``more``)."""
    from batchrun.lifecycle import RunOptions

    return RunOptions(
        restart=flags["restart"],
        retry_failed=flags["retry_failed"],
        skip_bad_lines=flags["skip_bad_lines"],
        dedupe=flags["dedupe"],
        mock=flags["mock"],
        reuse=tuple(flags["reuse"]),
        shard=_parse_shard(flags["shard"]),
        **more,
    )


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def fail(exc: BatchrunError) -> NoReturn:
    click.echo(f"batchrun: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="batchrun")
def main() -> None:
    """Send a table of prompts to an OpenAI-compatible chat API and get a Parquet
    file of completions and token usage back."""


@main.command(epilog=EXIT_CODES)
@click.argument("job_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@job_options
@send_options
@choice(
    "--output-format",
    among=("parquet", "openai-batch"),
    help="openai-batch: also write OpenAI Batch API output lines beside the Parquet file (OUTPUT with .jsonl).",
)
@choice(
    "--engine",
    among=("local", "ray"),
    help="ray: send the rows from Ray actors, on this machine or on the cluster RAY_ADDRESS names (pip install 'batchrun[ray]').",
)
@file_option("--log-file", help="Also write every event to this file.")
@choice(
    "--log-format",
    among=("text", "json"),
    help="json: one object per event.",
)
@flag("-q", "--quiet", help="No progress bar and no summary.")
@flag("-v", "--verbose", help="Log every retry and failed row to stderr.")
def run(job_file: Path | None, **flags: Any) -> None:
    """Run JOB_FILE (TOML), or a job made of flags alone.

    \b
    batchrun run jobs/summarize_tickets.toml --mock
    batchrun run --input tickets.jsonl --prompt-template 'Summarize: {ticket}' \\
        --model meta-llama/Llama-3.3-70B-Instruct --output out.parquet
    """
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        # Imports and logging set-up inside the try: a signal this early ends as any other.
        from batchrun.aio import run_coroutine
        from batchrun.config import load_job
        from batchrun.engines.local import run_job
        from batchrun.logs import setup_logging

        setup_logging(flags["log_file"], flags["log_format"], flags["verbose"], flags["quiet"])
        job = load_job(job_file, _overrides(flags))
        options = _run_options(
            flags,
            progress=not flags["quiet"],
            handle_signals=True,
            output_format=flags["output_format"],
        )
        if flags["engine"] == "ray":
            from batchrun.engines.ray import run_on_ray

            result = run_on_ray(job, options)
        else:
            result = run_coroutine(run_job(job, options))
    except (KeyboardInterrupt, Terminated) as exc:
        # A signal before sending began (the input scan) or after it ended (the
        # final write): the journal, if any, is whole; the same command resumes.
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
        fail(Interrupted.by_signal(signum, None))
    except BatchrunError as exc:
        import logging

        logging.getLogger("batchrun").error(
            "%s", exc, extra={"event": "stopped", "exit_code": exc.exit_code}
        )
        fail(exc)
    if not flags["quiet"]:
        click.echo(result.summary(), err=True)
    sys.exit(result.exit_code)


@main.command(
    epilog="Exit codes: 0 the job can run; 2 it would fail before sending (the message says why)."
)
@click.argument("job_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@job_options
@send_options
@click.option(
    "--show-pii-map",
    is_flag=True,
    help="Jobs with pii: also print the first rows' placeholders and the values they stand for (an audit on the terminal; never logged).",
)
def plan(job_file: Path | None, **flags: Any) -> None:
    """What `batchrun run` with the same job and flags would do, without
    sending anything: its checks (a changed job is refused alike), the rows it
    would send after an earlier run and --reuse, the first request (key
    hidden), estimated tokens, cost range and time."""
    from batchrun.config import load_job
    from batchrun.plan import plan_job

    try:
        job = load_job(job_file, _overrides(flags))
        planned = plan_job(job, _run_options(flags))
        click.echo(planned.text())
        if flags["show_pii_map"] and planned.pii is not None:
            click.echo(planned.pii.map_text())
    except BatchrunError as exc:
        fail(exc)


COMPARE_HELP = "Outputs to compare with (last night's; repeatable): figures side by side with the change in percent."
FAIL_IF_HELP = (
    "Exit 5 when a figure crosses a bound (repeatable): 'cost_per_row>+20%' (the change from "
    "--compare's outputs), 'failure_rate>0.05' (the value)."
)


@main.command(
    epilog="Exit codes: 0 reported; 2 bad outputs, prices or flags; 5 a --fail-if check is crossed."
)
@click.argument("outputs", nargs=-1, required=True, metavar="OUTPUT...")
@file_option(
    "--prices", help="Prices file (TOML, see jobs/prices.toml). Without it every cost is unpriced."
)
@click.option(
    "--by",
    multiple=True,
    metavar="COLUMN",
    help="Group by this output column (repeatable, or a,b); day: the UTC date of finished_at.",
)
@choice(
    "--format",
    "fmt",
    among=("table", "csv", "json", "markdown"),
    help="What to print on stdout.",
)
@file_option(
    "--html", help="Also write a self-contained HTML page (tables and charts) to this file."
)
@click.option("--compare", multiple=True, metavar="OUTPUT", help=COMPARE_HELP)
@click.option("--fail-if", "fail_if", multiple=True, metavar="CHECK", help=FAIL_IF_HELP)
def report(
    outputs: tuple[str, ...],
    prices: Path | None,
    by: tuple[str, ...],
    fmt: str,
    html: Path | None,
    compare: tuple[str, ...],
    fail_if: tuple[str, ...],
) -> None:
    """Rows, tokens and cost of finished jobs, from their OUTPUT files (files,
    folders of *.parquet, globs), in total and per --by group.

    \b
    batchrun report out/summaries.parquet --prices jobs/prices.toml --by priority
    batchrun report 'out/nightly/*.parquet' --by day --by model --format csv
    batchrun report out/tonight.parquet --compare out/last-night.parquet \\
        --prices jobs/prices.toml --fail-if 'cost_per_row>+20%' --fail-if 'failure_rate>0.05'

    Reused rows (attempts 0) are shown but not costed; a group with a model the
    prices file lacks is unpriced, never 0; an answer found in several files
    (shard parts and their merged file) is counted once.
    """
    from batchrun.report import build_report, render_chunks, write_html

    try:
        columns = [c for b in by for c in _comma_list(b)]
        result = build_report(
            outputs, by=columns, prices=prices, compare=compare or None, fail_if=fail_if
        )
        chunks = render_chunks(result, fmt)
        if html is not None:
            write_html(result, html)
    except BatchrunError as exc:
        fail(exc)
    for chunk in chunks:  # --by id: a million groups' lines, written a chunk at a time
        click.echo(chunk, nl=False)
    if html is not None:
        click.echo(f"wrote {html}", err=True)
    comparison = result.comparison
    if comparison is not None and comparison.crossed:
        for reason in comparison.crossed:
            click.echo(f"batchrun report: --fail-if {reason}", err=True)
        sys.exit(comparison.exit_code)


@main.command(
    epilog="Exit codes: 0 merged; 2 the files cannot be merged (the message says why; nothing written)."
)
@click.argument("outputs", nargs=-1, required=True, metavar="OUTPUT...")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The merged Parquet file (written atomically; may be one of the OUTPUTs).",
)
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help="The job's input (JSONL or Parquet): check that each of its ids has a row.",
)
@click.option(
    "--id-column",
    default=None,
    metavar="COLUMN",
    help="The input's id column [default: the job's id_column, from the outputs].",
)
@flag(
    "--prefer-ok",
    help="An id in several rows keeps its ok row, else the one that finished last (instead of failing).",
)
@flag("--allow-missing", help="Write the merged file even when input rows have no row.")
@flag(
    "--allow-mixed",
    help="Merge outputs of different jobs (model, prompts, parameters), noting each.",
)
@flag("-q", "--quiet", help="No summary.")
def merge(
    outputs: tuple[str, ...],
    output: Path,
    input_path: Path | None,
    id_column: str | None,
    prefer_ok: bool,
    allow_missing: bool,
    allow_mixed: bool,
    quiet: bool,
) -> None:
    """Merge the OUTPUT files (files, folders of *.parquet, globs) of a sharded job,
    or of several runs of one job, into one file in input order.

    \b
    batchrun merge 'out/part-*.parquet' -o out/summaries.parquet --input tickets.jsonl
    batchrun merge out/summaries.parquet out/retry.parquet -o out/summaries.parquet --prefer-ok

    Each id must appear once (--prefer-ok resolves doubles) and no input row may be
    missing: checked by id with --input, else by row number.
    """
    from batchrun.merge import merge_outputs

    try:
        result = merge_outputs(
            outputs,
            output,
            input_path,
            id_column,
            prefer_ok=prefer_ok,
            allow_missing=allow_missing,
            allow_mixed=allow_mixed,
        )
    except BatchrunError as exc:
        fail(exc)
    if not quiet:
        click.echo(result.summary(), err=True)


def _mock_flag(spec: dataclasses.Field[Any]) -> tuple[str, MockFlag]:
    flag: MockFlag = spec.metadata["flag"]
    return flag.name or "--" + spec.name.replace("_", "-"), flag


def _mock_option(spec: dataclasses.Field[Any]) -> Callable[[Any], Any]:
    name, flag = _mock_flag(spec)
    if flag.parse is not None or flag.env:
        return click.option(
            name, spec.name, default=None, metavar="A,B" if flag.parse else None, help=flag.help
        )
    default: Any = spec.default  # every MockConfig field has one
    if isinstance(default, bool):
        return click.option(name, spec.name, is_flag=True, default=default, help=flag.help)
    if flag.scale != 1:
        default *= flag.scale
    return click.option(name, spec.name, default=default, show_default=True, help=flag.help)


def mock_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """One flag per MockConfig field, from the field's ``metadata["flag"]``."""
    for spec in reversed(dataclasses.fields(MockConfig)):
        func = _mock_option(spec)(func)
    return func


def _mock_config(opts: dict[str, Any]) -> MockConfig:
    """The MockConfig that the flags of ``mock_options`` ask for."""
    import os

    values: dict[str, Any] = {}
    for spec in dataclasses.fields(MockConfig):
        name, flag = _mock_flag(spec)
        value = opts[spec.name]
        if flag.env:
            if not value:
                continue
            variable = value
            value = os.environ.get(variable)
            if not value:
                raise click.UsageError(f"{name} {variable}: that variable is not set.")
        elif flag.parse is not None:
            if not value:
                continue
            try:
                value = flag.parse(value)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint=name) from None
        elif flag.scale != 1:
            value /= flag.scale
        values[spec.name] = value
    try:
        return MockConfig(**values)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@main.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="Port (0: any free port).")
@mock_options
@click.option("--ready-file", default=None, help="Write the base URL to this file once listening.")
def mock_server(host: str, port: int, ready_file: str | None, **opts: Any) -> None:
    """Serve the embedded OpenAI-compatible endpoint (for demos, tests, benchmarks)."""
    from batchrun.mock import serve_forever

    serve_forever(_mock_config(opts), host=host, port=port, ready_file=ready_file)
