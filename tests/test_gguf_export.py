"""The adapter as a llama.cpp LoRA (GGUF): `gitlora adapters export --gguf`, read back with llama.cpp's own `gguf`
reader against the peft adapter it came from, and the daemon's `[export]` keeping `<repo>-current.gguf` and the
Ollama Modelfile in step with every promotion and rollback (a real daemon; the promotions go through
`registry.promote`, the code path a round's gate takes, and rollbacks through the CLI)."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from gitlora.daemon import config as config_mod
from gitlora.daemon import paths
from gitlora.daemon.gitrepo import GitRepo
from gitlora.trainer import gguf_export, registry

from daemonutil import DaemonProcess, gitlora, wait_stored
from gitutil import commit_files, init_repo

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"]
# peft module -> llama.cpp tensor (gguf's STARCODER2 map; written out here so a wrong map fails the test)
LLAMA_CPP_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                   "self_attn.o_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
LAYERS = 2


def _make_adapter(model, dest: Path, seed: int, targets=TARGETS, **lora) -> Path:
    """A real peft LoRA on the tiny StarCoder2 with non-zero A and B (a fresh LoRA's B is all zeros)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                                  task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(std=0.05)
    peft_model.save_pretrained(dest)
    peft_model.unload()  # the base model object gets its plain modules back for the next adapter
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny StarCoder2 base (weights, no tokenizer: the export reads only config.json) and two adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    from gitlora.trainer.tiny import tiny_config

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(256))
    model.save_pretrained(root / "base")
    adapters = {f"v{n:04d}": _make_adapter(model, root / f"adapter{n}", seed=n) for n in (1, 2)}
    adapters["embed"] = _make_adapter(model, root / "adapter-embed", seed=3, targets=["embed_tokens"])
    adapters["rslora"] = _make_adapter(model, root / "adapter-rslora", seed=4, use_rslora=True)
    return {"base": root / "base", **adapters}


def install_adapters(repo: Path, versions: dict[str, Path]) -> Path:
    """Versions in the repository's registry as rounds leave them, each trained from the one before."""
    adapters = paths.RepoPaths.for_git_dir(GitRepo(repo).common_dir).adapters
    adapters.mkdir(parents=True, exist_ok=True)
    parent = None
    for version, source in versions.items():
        shutil.copytree(source, adapters / version)
        (adapters / version / registry.METRICS).write_text(json.dumps({"parent": parent}))
        parent = version
    return adapters


def write_config(home: Path, base: Path, **export) -> None:
    config = home / ".config/gitlora/config.toml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(f'[train]\nbase_model = "{base}"\nmin_new_examples = 1000000\n[export]\n'
                      + "".join(f"{k} = {json.dumps(v)}\n" for k, v in export.items()))


def read_gguf(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    return meta, {t.name: t for t in reader.tensors}


def assert_matches_peft(path: Path, adapter_dir: Path, version: str) -> None:
    """Metadata, and every LoRA tensor under llama.cpp's name with llama.cpp's shape, f32, peft's values."""
    meta, tensors = read_gguf(path)
    assert meta["general.architecture"] == "starcoder2"
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["adapter.lora.alpha"] == 8.0
    assert meta[gguf_export.KEY_VERSION] == version
    peft_tensors = load_file(adapter_dir / "adapter_model.safetensors")
    assert len(tensors) == len(peft_tensors) == LAYERS * len(TARGETS) * 2
    for layer in range(LAYERS):
        for module, ours in LLAMA_CPP_NAMES.items():
            for part in ("A", "B"):
                expected = peft_tensors[f"base_model.model.model.layers.{layer}.{module}.lora_{part}.weight"].numpy()
                tensor = tensors[f"blk.{layer}.{ours}.weight.lora_{part.lower()}"]
                assert tensor.tensor_type == gguf.GGMLQuantizationType.F32
                # GGUF lists dimensions innermost first: lora_a is ne = [in, r], lora_b is ne = [r, out]
                assert list(tensor.shape) == list(reversed(expected.shape))
                assert np.array_equal(np.asarray(tensor.data).reshape(expected.shape), expected)


def test_cli_export_is_llama_cpp_lora_with_peft_values(tmp_path, isolated_home, tiny):
    write_config(isolated_home, tiny["base"])
    repo = init_repo(tmp_path / "app")
    adapters = install_adapters(repo, {"v0001": tiny["v0001"], "v0002": tiny["v0002"]})
    registry.promote(adapters, "v0002")
    before = {p: p.read_bytes() for p in tiny["base"].iterdir()}

    out = tmp_path / "out" / "app.gguf"
    done = gitlora("adapters", "export", "--gguf", str(out), "--repo", str(repo))  # current = v0002
    assert "v0002 written to" in done.stdout and "--lora" in done.stdout
    assert_matches_peft(out, tiny["v0002"], "v0002")
    gitlora("adapters", "export", "--gguf", str(out), "1", "--repo", str(repo))
    assert_matches_peft(out, tiny["v0001"], "v0001")
    assert {p: p.read_bytes() for p in tiny["base"].iterdir()} == before  # nothing merged into the base
    assert registry.current_version(adapters) == "v0002"
    assert [p.name for p in out.parent.iterdir()] == ["app.gguf"]  # no temp file left behind


def test_rslora_scaling_is_carried_in_alpha(tmp_path, tiny):
    out = tmp_path / "r.gguf"
    result = gguf_export.export_gguf(tiny["rslora"], str(tiny["base"]), out)
    meta, _ = read_gguf(out)
    # peft scales rsLoRA by alpha / sqrt(r), llama.cpp by alpha / r: the file carries alpha * sqrt(r)
    assert meta["adapter.lora.alpha"] == pytest.approx(8 * math.sqrt(4)) == result["alpha"]


def test_unmapped_architecture_or_module_is_refused_in_one_line(tmp_path, isolated_home, tiny):
    repo = init_repo(tmp_path / "app")
    install_adapters(repo, {"v0001": tiny["v0001"], "v0002": tiny["embed"]})
    other = tmp_path / "llama-base"
    shutil.copytree(tiny["base"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["LlamaForCausalLM"]}))
    out = tmp_path / "out.gguf"

    write_config(isolated_home, other)
    done = gitlora("adapters", "export", "--gguf", str(out), "v0001", "--repo", str(repo), check=False)
    assert done.returncode == 1 and not out.exists()
    [line] = done.stdout.splitlines()
    assert "LlamaForCausalLM has no llama.cpp LoRA mapping" in line and "Starcoder2ForCausalLM" in line

    write_config(isolated_home, tiny["base"])
    done = gitlora("adapters", "export", "--gguf", str(out), "v0002", "--repo", str(repo), check=False)
    assert done.returncode == 1 and not out.exists()
    [line] = done.stdout.splitlines()
    assert "embedding LoRA" in line and "Traceback" not in done.stderr


def test_half_precision_adapters_are_read_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    saved = {"a": torch.randn(4, 8).to(torch.bfloat16), "b": torch.randn(8, 4).to(torch.float16),
             "c": torch.randn(3, 5)}
    save_file(saved, tmp_path / "x.safetensors")
    read = gguf_export.read_safetensors(tmp_path / "x.safetensors")
    for name, tensor in saved.items():
        assert read[name].dtype == np.float32 and np.array_equal(read[name], tensor.float().numpy())


def test_a_target_module_without_a_llama_cpp_tensor_is_refused(tiny):
    arch, blocks = gguf_export.architecture(json.loads((tiny["base"] / "config.json").read_text()))
    tensors = gguf_export.read_safetensors(tiny["v0001"] / "adapter_model.safetensors")
    assert len(gguf_export.lora_tensors(tensors, arch, blocks, tied_embeddings=True)) == len(tensors)
    renamed = {k.replace("self_attn.q_proj", "self_attn.rotary_proj"): v for k, v in tensors.items()}
    with pytest.raises(gguf_export.ExportError, match=r"self_attn\.rotary_proj has no llama.cpp tensor in starcoder2"):
        gguf_export.lora_tensors(renamed, arch, blocks, tied_embeddings=True)
    a, b = np.ones((4, 128), np.float32), np.ones((256, 4), np.float32)
    lm_head = {"base_model.model.lm_head.lora_A.weight": a, "base_model.model.lm_head.lora_B.weight": b}
    with pytest.raises(gguf_export.ExportError, match="ties lm_head to the embeddings"):
        gguf_export.lora_tensors(lm_head, arch, blocks, tied_embeddings=True)
    assert [n for n, _ in gguf_export.lora_tensors(lm_head, arch, blocks, tied_embeddings=False)] == [
        "output.weight.lora_a", "output.weight.lora_b"]


@pytest.mark.parametrize("export, message", [
    ({"dir": "relative/dir"}, "export.dir: "),
    ({"ollama_model": "gitlora"}, "export.ollama_model needs export.ollama_from"),
    ({"dir": "/x", "ollama_from": "starcoder2:3b", "ollama_model": "bad name"}, "export.ollama_model: "),
    ({"check_interval_s": 0}, "allowed: an integer from 1 to 3,600"),
])
def test_export_config_is_strict(export, message):
    with pytest.raises(config_mod.ConfigError, match=message) as caught:
        config_mod.from_dict({"export": export})
    assert "\n" not in str(caught.value)


def test_export_files_are_named_after_the_repository_unless_two_share_a_name():
    from types import SimpleNamespace

    from gitlora.daemon.adapter_export import file_stem

    def served(name: str, key: str):
        return SimpleNamespace(name=name, paths=SimpleNamespace(root=Path("/state/repos") / key))

    app, other_app, tool = served("app", "app-1a2b3c4d"), served("app", "app-5e6f7a8b"), served("my tool", "x")
    assert file_stem(tool, [app, tool]) == "my_tool" and file_stem(app, [app, tool]) == "app"
    assert {file_stem(app, [app, other_app]), file_stem(other_app, [app, other_app])} == {"app-1a2b3c4d",
                                                                                           "app-5e6f7a8b"}


# -- the daemon keeps the export in step -------------------------------------------------------------------
WAIT_S = 180  # a hang on a loaded 2-core box, not how long an export takes (about a second)


def wait_export(repo_state: Path, version: str, ok: bool = True, timeout: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            record = json.loads((repo_state / "export.json").read_text())
        except (OSError, ValueError):
            record = {}
        if record.get("version") == version and record.get("ok") == ok:
            return record
        time.sleep(0.1)
    raise AssertionError(f"no {'successful' if ok else 'failed'} export of {version} in {timeout}s: {record}")


def fake_ollama(bin_dir: Path, exit_code: int = 0) -> Path:
    """An `ollama` on PATH that logs its arguments and the Modelfile it was given (the real one is a server)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = bin_dir / "calls.log"
    script = bin_dir / "ollama"
    script.write_text(f'#!/bin/sh\necho "$@" >> {log}\ncat "$4" >> {log}\n'
                      + (f'echo "Error: pull model manifest: file does not exist" >&2\nexit {exit_code}\n'
                         if exit_code else "exit 0\n"))
    script.chmod(0o755)
    return log


def start_daemon_with(repo: Path, bin_dir: Path) -> DaemonProcess:
    daemon = DaemonProcess(env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}).start()
    gitlora("install", str(repo))
    wait_stored(repo, [commit_files(repo, {"src/lib.rs": "pub fn one() -> u32 { 1 }\n"}, "one")])
    return daemon


def test_daemon_exports_after_each_promotion_and_rollback(tmp_path, isolated_home, tiny):
    export_dir = tmp_path / "models"
    write_config(isolated_home, tiny["base"], dir=str(export_dir), ollama_from="starcoder2:3b",
                 ollama_model="gitlora-{repo}", check_interval_s=1)
    calls = fake_ollama(tmp_path / "bin")
    repo = init_repo(tmp_path / "app")
    adapters = install_adapters(repo, {"v0001": tiny["v0001"], "v0002": tiny["v0002"]})
    state = adapters.parent
    daemon = start_daemon_with(repo, tmp_path / "bin")
    try:
        gguf_file, modelfile = export_dir / "app-current.gguf", export_dir / "app.Modelfile"
        registry.promote(adapters, "v0001")  # what a round's gate does
        record = wait_export(state, "v0001")
        assert_matches_peft(gguf_file, tiny["v0001"], "v0001")
        assert modelfile.read_text() == f"FROM starcoder2:3b\nADAPTER {gguf_file.resolve()}\n"
        assert record["ollama"] == "created gitlora-app"
        assert calls.read_text() == f"create gitlora-app -f {modelfile}\n{modelfile.read_text()}"

        registry.promote(adapters, "v0002")
        wait_export(state, "v0002")
        assert_matches_peft(gguf_file, tiny["v0002"], "v0002")

        done = gitlora("adapters", "rollback", "--repo", str(repo))
        assert "v0001" in done.stdout
        wait_export(state, "v0001")
        assert_matches_peft(gguf_file, tiny["v0001"], "v0001")
        assert calls.read_text().count("create gitlora-app") == 3
        assert sorted(p.name for p in export_dir.iterdir()) == ["app-current.gguf", "app.Modelfile"]

        text = gitlora("status").stdout
        assert f"export    v0001 -> {gguf_file}" in text and "ollama: created gitlora-app" in text
        [view] = daemon.status()["repos"]
        assert view["export"]["last"]["ok"] and view["training"]["current_adapter"] == "v0001"
    finally:
        assert daemon.stop() == 0


def test_a_failing_export_is_recorded_and_leaves_current_and_the_daemon_alone(tmp_path, isolated_home, tiny):
    export_dir = tmp_path / "models"
    write_config(isolated_home, tiny["base"], dir=str(export_dir), ollama_from=str(tmp_path / "base.gguf"),
                 check_interval_s=1)
    calls = fake_ollama(tmp_path / "bin", exit_code=1)
    repo = init_repo(tmp_path / "app")
    adapters = install_adapters(repo, {"v0001": tiny["v0001"], "v0002": tiny["v0002"], "v0003": tiny["v0001"]})
    (adapters / "v0003" / "adapter_model.safetensors").write_bytes(b"\x08")  # a damaged version
    state = adapters.parent
    daemon = start_daemon_with(repo, tmp_path / "bin")
    try:
        gguf_file = export_dir / "app-current.gguf"
        registry.promote(adapters, "v0002")
        wait_export(state, "v0002")
        good = gguf_file.read_bytes()
        assert not calls.exists()  # no ollama_model: no `ollama create`

        registry.promote(adapters, "v0003")
        record = wait_export(state, "v0003", ok=False)
        assert "not a safetensors file" in record["reason"] and "\n" not in record["reason"]
        assert registry.current_version(adapters) == "v0003"
        assert gguf_file.read_bytes() == good  # the previous adapter still serves
        assert "export    v0003 FAILED" in gitlora("status").stdout

        # The daemon goes on: a rollback is exported again, and the failure was tried once, not every check.
        gitlora("adapters", "rollback", "v0002", "--repo", str(repo))
        wait_export(state, "v0002")
        assert gguf_file.read_bytes() == good
        [view] = daemon.status()["repos"]
        assert view["state"] == "ok" and view["training"]["current_adapter"] == "v0002"
        log = (paths.state_home() / "daemon.log").read_text()
        assert [json.loads(line).get("version") for line in log.splitlines()
                if '"export_failed"' in line] == ["v0003"]
        assert (export_dir / "app.Modelfile").read_text().startswith(f"FROM {tmp_path / 'base.gguf'}\n")

        # Reloaded settings export again; a failing `ollama create` is the export's failure, in one line.
        write_config(isolated_home, tiny["base"], dir=str(export_dir), ollama_from="starcoder2:3b",
                     ollama_model="mine", check_interval_s=1)
        daemon.proc.send_signal(signal.SIGHUP)
        record = wait_export(state, "v0002", ok=False)
        assert record["reason"] == ("ollama create mine failed (exit 1): "
                                    "Error: pull model manifest: file does not exist")
        assert calls.read_text().startswith(f"create mine -f {export_dir / 'app.Modelfile'}\nFROM starcoder2:3b\n")
        assert registry.current_version(adapters) == "v0002" and daemon.status()["ok"]
    finally:
        assert daemon.stop() == 0


def test_ollama_create_is_skipped_without_ollama_on_path(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    result = gguf_export.publish(str(tiny["v0001"]), str(tiny["base"]), str(tmp_path / "a.gguf"), version="v0001",
                                 modelfile=str(tmp_path / "a.Modelfile"), ollama_from="starcoder2:3b",
                                 ollama_model="mine")
    assert result["ok"] and result["ollama"] == "skipped: ollama is not on PATH"
    assert (tmp_path / "a.Modelfile").read_text() == f"FROM starcoder2:3b\nADAPTER {tmp_path / 'a.gguf'}\n"
