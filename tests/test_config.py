"""Tests of the job definition: KEYS, load_job, Job.url and Job.settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from batchrun.config import DEFAULT_BASE_URL, KEYS, KEYS_BY_NAME, Job, load_job
from batchrun.errors import JobError
from tests.conftest import TEST_KEY

MINIMAL = 'input = "data/in.jsonl"\nmodel = "m-1"\nprompt_template = "Summarize: {ticket}"\n'


def write_job(folder: Path, text: str, name: str = "job.toml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def flags(**values: Any) -> dict[str, Any]:
    """Overrides that make a complete job, with ``values`` laid over them."""
    base: dict[str, Any] = {"input": "in.jsonl", "model": "m-1", "prompt_template": "{ticket}"}
    base.update(values)
    return base


# ---- loading ------------------------------------------------------------


def test_load_job_from_file(tmp_path: Path) -> None:
    path = write_job(
        tmp_path / "jobs",
        MINIMAL + 'output = "out/result.parquet"\n'
        'system_prompt = "Be brief."\n'
        'keep_columns = ["customer", "priority"]\n'
        "temperature = 0.2\n"
        "max_tokens = 120\n"
        "concurrency = 8\n"
        'endpoint = "inference"\n'
        "[metadata]\n"
        'job = "summaries"\n',
    )
    job = load_job(path)
    assert job.model == "m-1"
    assert job.prompt_template == "Summarize: {ticket}"
    assert job.system_prompt == "Be brief."
    assert job.keep_columns == ("customer", "priority")
    assert job.temperature == 0.2
    assert isinstance(job.temperature, float)
    assert job.max_tokens == 120
    assert job.concurrency == 8
    assert job.endpoint == "inference"
    assert job.metadata == {"job": "summaries"}
    assert job.job_file == path
    # Defaults for keys the file leaves out.
    assert job.base_url == DEFAULT_BASE_URL
    assert job.id_column == "id"
    assert job.api_key_env == "LLMTUNE_API_KEY"
    assert job.max_attempts == KEYS_BY_NAME["max_attempts"].default
    assert job.messages_column is None
    assert job.allow_insecure_http is False


def test_load_job_from_overrides_alone() -> None:
    job = load_job(None, flags(max_tokens=64, keep_columns="customer, priority ,"))
    assert job.input == Path("in.jsonl")
    assert job.output is None
    assert job.model == "m-1"
    assert job.max_tokens == 64
    # A comma-separated flag value becomes a tuple of names (blanks dropped).
    assert job.keep_columns == ("customer", "priority")
    assert job.job_file is None
    assert job.temperature == KEYS_BY_NAME["temperature"].default


def test_int_given_for_float_key_becomes_float_and_whole_float_for_int_key_becomes_int() -> None:
    job = load_job(None, flags(temperature=1, max_tokens=64.0))
    assert job.temperature == 1.0 and isinstance(job.temperature, float)
    assert job.max_tokens == 64 and isinstance(job.max_tokens, int)


def test_overrides_win_over_file_and_none_means_not_given(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + "max_tokens = 100\ntemperature = 0.5\n")
    job = load_job(path, {"max_tokens": 7, "model": "m-2", "temperature": None})
    assert job.max_tokens == 7
    assert job.model == "m-2"
    assert job.temperature == 0.5  # None leaves the file's value


def test_paths_in_job_file_are_relative_to_its_folder(tmp_path: Path) -> None:
    path = write_job(
        tmp_path / "a" / "jobs",
        'input = "../data/in.jsonl"\noutput = "out.parquet"\nmodel = "m"\nprompt_template = "{x}"\n',
    )
    job = load_job(path)
    assert job.input == tmp_path / "a" / "data" / "in.jsonl"
    assert job.output == tmp_path / "a" / "jobs" / "out.parquet"


def test_absolute_path_in_job_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere" / "in.jsonl"
    path = write_job(
        tmp_path / "jobs", f'input = "{target}"\nmodel = "m"\nprompt_template = "{{x}}"\n'
    )
    assert load_job(path).input == target


def test_override_paths_are_relative_to_working_directory(tmp_path: Path) -> None:
    path = write_job(tmp_path / "jobs", MINIMAL)
    job = load_job(path, {"input": "local/in.jsonl", "output": "o.parquet"})
    # Not rebased onto the job file's folder.
    assert job.input == Path("local/in.jsonl")
    assert job.output == Path("o.parquet")
    assert not job.input.is_absolute()


# ---- unknown keys and wrong types -------------------------------------------


def test_unknown_key_in_file_suggests_the_close_key_and_names_the_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + "max_token = 5\n")
    with pytest.raises(JobError) as info:
        load_job(path)
    msg = str(info.value)
    assert "`max_token`" in msg
    assert "Did you mean `max_tokens`?" in msg
    assert str(path) in msg


def test_unknown_override_key_suggests_and_names_the_source() -> None:
    with pytest.raises(JobError, match=r"Did you mean `temperature`\?") as info:
        load_job(None, flags(temprature=0.1), overrides_source="keyword")
    assert "keyword" in str(info.value)


def test_unknown_key_without_close_match_has_no_suggestion(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + 'zzzzzz = "q"\n')
    with pytest.raises(JobError, match="zzzzzz") as info:
        load_job(path)
    assert "Did you mean" not in str(info.value)


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('max_tokens = "100"', "max_tokens", "must be a number"),
        ("max_tokens = true", "max_tokens", "must be a number"),
        ("max_tokens = 1.5", "max_tokens", "whole number"),
        ("max_tokens = 0", "max_tokens", "at least 1"),
        ("temperature = 2.5", "temperature", "at most 2"),
        ("temperature = -0.1", "temperature", "at least 0"),
        ('temperature = "hot"', "temperature", "must be a number"),
        ("concurrency = 0", "concurrency", "at least 1"),
        ("concurrency = 5000", "concurrency", "at most 4096"),
        ("keep_columns = 5", "keep_columns", "list of column names"),
        ("keep_columns = [1, 2]", "keep_columns", "list of column names"),
        ('metadata = "x"', "metadata", "must be a table"),
        ('metadata = ["a"]', "metadata", "must be a table"),
        ('endpoint = "completions"', "endpoint", "one of: chat, inference"),
        ("model = 3", "model", "must be a string"),
        ('allow_insecure_http = "yes"', "allow_insecure_http", "true or false"),
        ('output = ""', "output", "is empty"),
    ],
)
def test_wrong_type_in_file_names_key_and_file(
    tmp_path: Path, line: str, key: str, words: str
) -> None:
    # A later line for a key the MINIMAL text sets would be a TOML duplicate; MINIMAL's
    # model line is dropped for the model case.
    text = MINIMAL.replace('model = "m-1"\n', "") if key == "model" else MINIMAL
    path = write_job(tmp_path, text + line + "\n")
    with pytest.raises(JobError) as info:
        load_job(path)
    msg = str(info.value)
    assert f"`{key}` in {path}" in msg
    assert words in msg


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("max_tokens", "100", "must be a number"),
        ("max_tokens", True, "must be a number"),
        ("concurrency", 2.5, "whole number"),
        ("concurrency", 4097, "at most 4096"),
        ("temperature", 3, "at most 2"),
        ("request_timeout_s", 0, "at least 0.001"),
        ("keep_columns", {"a": 1}, "list of column names"),
        ("metadata", ["a"], "must be a table"),
        ("endpoint", "CHAT", "one of: chat, inference"),
        ("allow_insecure_http", 1, "true or false"),
    ],
)
def test_wrong_type_in_override_names_key_and_source(key: str, value: Any, words: str) -> None:
    with pytest.raises(JobError) as info:
        load_job(None, flags(**{key: value}))
    msg = str(info.value)
    assert f"`{key}` (flag)" in msg
    assert words in msg


def test_range_bounds_are_inclusive() -> None:
    job = load_job(None, flags(temperature=2.0, concurrency=4096, max_tokens=1))
    assert (job.temperature, job.concurrency, job.max_tokens) == (2.0, 4096, 1)
    assert load_job(None, flags(temperature=0.0)).temperature == 0.0


def test_nan_temperature_is_rejected(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + "temperature = nan\n")
    with pytest.raises(JobError, match="temperature"):
        load_job(path)


# ---- required keys and prompt source ------------------------------------


@pytest.mark.parametrize("missing", ["input", "model"])
def test_missing_required_key(missing: str) -> None:
    values = flags()
    del values[missing]
    with pytest.raises(JobError, match=f"No `{missing}` given") as info:
        load_job(None, values)
    assert f"--{missing}" in str(info.value)


def test_missing_required_key_in_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "in.jsonl"\nprompt_template = "{x}"\n')
    with pytest.raises(JobError, match="No `model` given"):
        load_job(path)


def test_both_prompt_template_and_messages_column_rejected() -> None:
    with pytest.raises(JobError, match="exactly one of `prompt_template`"):
        load_job(None, flags(messages_column="messages"))


def test_neither_prompt_template_nor_messages_column_rejected(tmp_path: Path) -> None:
    path = write_job(tmp_path, 'input = "in.jsonl"\nmodel = "m"\n')
    with pytest.raises(JobError, match="exactly one of `prompt_template`") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_empty_prompt_template_counts_as_not_set() -> None:
    with pytest.raises(JobError, match="exactly one of"):
        load_job(None, flags(prompt_template=""))


def test_messages_column_alone_is_accepted() -> None:
    values = flags(messages_column="messages")
    del values["prompt_template"]
    job = load_job(None, values)
    assert job.messages_column == "messages"
    assert job.prompt_template is None


# ---- the job file itself ------------------------------------------------


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + "max_tokens = = 3\n")
    with pytest.raises(JobError, match="not valid TOML") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_missing_job_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(JobError, match="does not exist") as info:
        load_job(path)
    assert str(path) in str(info.value)


def test_sample_job_file_loads() -> None:
    repo = Path(__file__).resolve().parent.parent
    job = load_job(repo / "jobs" / "summarize_tickets.toml")
    assert job.input == repo / "sample_data" / "tickets.jsonl"
    assert job.keep_columns == ("customer", "priority", "product")


# ---- base_url -----------------------------------------------------------


def test_plain_http_to_remote_host_refused() -> None:
    with pytest.raises(JobError, match="plain http://") as info:
        load_job(None, flags(base_url="http://api.example.com/v1"))
    assert "api.example.com" in str(info.value)
    assert "--allow-insecure-http" in str(info.value)


def test_plain_http_to_remote_host_refused_from_file(tmp_path: Path) -> None:
    path = write_job(tmp_path, MINIMAL + 'base_url = "http://10.0.0.5:8000/v1"\n')
    with pytest.raises(JobError, match="plain http://"):
        load_job(path)


def test_plain_http_to_remote_host_allowed_with_flag() -> None:
    job = load_job(None, flags(base_url="http://api.example.com/v1", allow_insecure_http=True))
    assert job.base_url == "http://api.example.com/v1"
    assert job.allow_insecure_http is True


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.5/v1",
        "http://localhost:8000/v1",
        "http://LOCALHOST/v1",
        "http://[::1]:8000/v1",
        "https://api.example.com/v1",
    ],
)
def test_loopback_http_and_https_allowed(url: str) -> None:
    assert load_job(None, flags(base_url=url)).base_url == url


@pytest.mark.parametrize(
    "url", ["ftp://example.com/v1", "api.example.com/v1", "http://", "https:///v1"]
)
def test_base_url_that_is_not_http_rejected(url: str) -> None:
    with pytest.raises(JobError, match="not an http"):
        load_job(None, flags(base_url=url))


# ---- Job.url ------------------------------------------------------------


def test_url_for_chat_endpoint() -> None:
    job = load_job(None, flags(base_url="https://api.example.com/v1/"))
    assert job.url == "https://api.example.com/v1/chat/completions"


def test_url_for_inference_endpoint_keeps_slash_in_model() -> None:
    job = load_job(
        None,
        flags(
            base_url="https://api.example.com/v1",
            endpoint="inference",
            model="meta-llama/Llama-3.3-70B",
        ),
    )
    assert job.url == "https://api.example.com/v1/models/meta-llama/Llama-3.3-70B/inference"


def test_url_default_base() -> None:
    assert load_job(None, flags()).url == DEFAULT_BASE_URL + "/chat/completions"


# ---- settings and KEYS ----------------------------------------------------


def test_settings_hold_no_secret_and_are_json_serialisable(
    tmp_path: Path, api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MY_API_KEY", TEST_KEY)
    path = write_job(
        tmp_path,
        MINIMAL
        + 'keep_columns = ["a"]\napi_key_env = "MY_API_KEY"\n[metadata]\nteam = "x"\nn = 3\n',
    )
    job = load_job(path, {"output": "o.parquet"})
    settings = job.settings()
    text = json.dumps(settings)  # raises if anything is not plain JSON
    assert api_key not in text
    assert TEST_KEY not in text
    assert settings["api_key_env"] == "MY_API_KEY"
    assert settings["keep_columns"] == ["a"]
    assert settings["metadata"] == {"team": "x", "n": 3}
    assert settings["input"] == str(tmp_path / "data" / "in.jsonl")
    assert settings["output"] == "o.parquet"
    assert settings["job_file"] == str(path)
    assert set(settings) == {f.name for f in dataclasses.fields(Job)}


def test_settings_without_job_file_or_output() -> None:
    settings = load_job(None, flags()).settings()
    assert settings["job_file"] is None
    assert settings["output"] is None
    json.dumps(settings)


def test_every_job_field_is_a_key_and_every_key_a_field() -> None:
    job_fields = {f.name for f in dataclasses.fields(Job)} - {"job_file"}
    assert job_fields == {key.name for key in KEYS}
    assert len(KEYS_BY_NAME) == len(KEYS)  # no key defined twice


def test_key_flags() -> None:
    assert KEYS_BY_NAME["max_tokens"].flag == "--max-tokens"
    assert KEYS_BY_NAME["allow_insecure_http"].flag == "--allow-insecure-http"


def test_job_is_frozen() -> None:
    job = load_job(None, flags())
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.model = "other"  # type: ignore[misc]
