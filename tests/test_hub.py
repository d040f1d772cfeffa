"""fetch and push, up to the network: the hub calls are stood in for by recording fakes, and the real code path is
run against an unreachable hub (offline mode, a closed local port)."""

from __future__ import annotations

import pytest

from conftest import run_cli
from peftctl import hub
from peftctl.errors import InvalidInput, PeftctlError
from peftctl.recipe.loader import parse_recipe

HUB_RECIPE = """\
model: {name: meta-llama/Meta-Llama-3-8B, revision: abc123}
method: {name: lora}
dataset:
  mix:
    - {path: yahma/alpaca-cleaned}
    - {path: HuggingFaceH4/ultrachat_200k, split: train_sft, format: chat}
    - {path: data/local.jsonl}
  validation: org/held-out
output: {dir: runs/x}
"""


class GatedRepoError(Exception):
    pass


class RepositoryNotFoundError(Exception):
    pass


def test_fetch_downloads_the_model_and_every_hub_dataset(tmp_path):
    recipe = parse_recipe(HUB_RECIPE, "r.yaml", tmp_path, check_paths=False).recipe
    calls = []
    report = hub.fetch(recipe, snapshot_download=lambda **kw: calls.append(("model", kw)) or "/cache/model",
                       load_dataset=lambda path, split: calls.append(("data", path, split)), say=lambda m: None)
    model_call = calls[0][1]
    assert model_call["repo_id"] == "meta-llama/Meta-Llama-3-8B" and model_call["revision"] == "abc123"
    assert "*.safetensors" in model_call["allow_patterns"] and "tokenizer*" in model_call["allow_patterns"]
    assert calls[1:] == [("data", "yahma/alpaca-cleaned", "train"),
                         ("data", "HuggingFaceH4/ultrachat_200k", "train_sft"),
                         ("data", "org/held-out", "validation")]
    assert report.skipped == [str(tmp_path / "data" / "local.jsonl")] and report.model_path == "/cache/model"


@pytest.mark.parametrize("error, kind, fragment", [
    (GatedRepoError("403 gated"), InvalidInput, "accept its terms"),
    (RepositoryNotFoundError("404"), InvalidInput, "hf auth login"),
    (ConnectionError("no route to host"), PeftctlError, "could not reach the hub"),
])
def test_fetch_errors_are_classified(tmp_path, error, kind, fragment):
    recipe = parse_recipe(HUB_RECIPE, "r.yaml", tmp_path, check_paths=False).recipe

    def failing(**kwargs):
        raise error

    with pytest.raises(kind) as err:
        hub.fetch(recipe, snapshot_download=failing, load_dataset=lambda *a, **k: None, say=lambda m: None)
    assert fragment in (err.value.message + " " + (err.value.hint or ""))
    assert err.value.exit_code == (2 if kind is InvalidInput else 1)


def test_fetch_offline_reaches_for_the_network_and_exits_1(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(HUB_RECIPE.replace("    - {path: data/local.jsonl}\n", ""))
    result = run_cli("fetch", str(path), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 1, result.stderr
    assert "could not reach the hub" in result.stderr and "Traceback" not in result.stderr


class RecordingApi:
    def __init__(self):
        self.calls = []

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))

    def upload_file(self, **kwargs):
        self.calls.append(("upload_file", kwargs))


@pytest.fixture(scope="module")
def finished_run(tiny_model, trained):
    return trained("pushed", tiny_model("llama"))  # push only reads the run: the session's shared one


def test_push_uploads_the_adapter_with_a_model_card(finished_run):
    api = RecordingApi()
    url = hub.push(finished_run, "someone/tiny-lora", private=True, api=api, say=lambda m: None)
    assert url == "https://huggingface.co/someone/tiny-lora"
    (_, create), (_, folder), (_, card) = api.calls
    assert create == {"repo_id": "someone/tiny-lora", "private": True, "exist_ok": True}
    assert folder["folder_path"] == str(finished_run / "adapter")
    text = card["path_or_fileobj"].decode()
    assert card["path_in_repo"] == "README.md" and text.startswith("---\nbase_model:")
    assert "library_name: peft" in text and "lora" in text and "steps: 4" in text  # the shared run's 4
    assert "AutoPeftModelForCausalLM" in text and str(finished_run) not in text  # no local paths leak


def test_push_refuses_what_is_not_a_finished_run(finished_run, tmp_path):
    with pytest.raises(InvalidInput, match="not a finished run folder"):
        hub.push(tmp_path, "someone/x", api=RecordingApi(), say=lambda m: None)
    with pytest.raises(InvalidInput) as err:
        hub.push(finished_run, "someone/x", merged=True, api=RecordingApi(), say=lambda m: None)
    assert "merged/" in err.value.message
    with pytest.raises(InvalidInput, match="a repository id is owner/name"):
        hub.push(finished_run, "no-owner", api=RecordingApi(), say=lambda m: None)


def test_push_to_an_unreachable_hub_exits_1_without_showing_the_token(finished_run):
    sentinel = "hf_SENTINEL_PUSH_TOKEN_0123456789"
    result = run_cli("push", str(finished_run), "someone/tiny-lora",
                     env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": sentinel, "HF_HUB_OFFLINE": "0",
                          "HF_HUB_ETAG_TIMEOUT": "2", "HF_HUB_DOWNLOAD_TIMEOUT": "2"}, timeout=120)
    assert result.returncode == 1, result.stderr
    assert "could not reach the hub" in result.stderr
    assert sentinel not in result.stderr and sentinel not in result.stdout
