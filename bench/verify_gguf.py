"""Does llama.cpp, loading gitlora's GGUF LoRA on top of the base model's GGUF, compute what transformers + peft
compute? Not CI: it builds llama.cpp's Python binding from PyPI's source distribution (minutes, once; cached).

    python bench/verify_gguf.py [--base DIR] [--cache DIR] [--work DIR] [--max-steps N]

1. llama-cpp-python (pinned) from PyPI's sdist, built under `nice -n 19` into `<cache>/site` (kept; the sdist's
   vendored llama.cpp, with convert_hf_to_gguf.py, is kept in `<cache>/src`).
2. The base model (default: the pretrained tiny StarCoder2 of bench_learning, copied, never modified) converted to
   GGUF (f32) with that convert_hf_to_gguf.py.
3. A LoRA trained by gitlora's own trainer (one short round), exported with gitlora's GGUF export; the same
   adapter also through llama.cpp's own convert_lora_to_gguf.py, whose tensors and adapter keys must be identical.
4. The same token ids (plain code prompts and a fill-in-the-middle prompt) through transformers + peft and through
   llama.cpp with the adapter; and llama.cpp without it. Reported: top-1 agreement of the next-token
   distributions over all positions, the largest absolute log-probability difference, and how far the adapter
   moves llama.cpp's own output.

It fails (exit 1) below 99 % top-1 agreement, or when the adapter does not visibly change llama.cpp's output
(largest change under 10x the largest llama.cpp-vs-peft difference): an adapter llama.cpp silently ignored would
otherwise pass, since base and adapter agree on most top-1 tokens.

The pre-tokenizer. convert_hf_to_gguf.py identifies a BPE tokenizer's pre-tokenizer by the hash of the token ids it
gives a fixed text, from a table that convert_hf_to_gguf_update.py generates by downloading known models' tokenizers.
A locally trained tokenizer (the tiny model's) is in no table, and the converter stops ("BPE pre-tokenizer was not
recognized"). The update script's mechanism is a line `if chkhsh == <hash>: res = <llama.cpp pre-tokenizer>`; this
script adds exactly that entry at run time for this tokenizer's hash (the vendored file is not edited), choosing the
pre-tokenizer from tokenizer.json: a lone ByteLevel pre-tokenizer with its regex is GPT-2's split, llama.cpp's
"gpt-2"; anything else is refused. That the choice is right is then checked: llama.cpp's tokenizer must give the
same ids as the Hugging Face tokenizer on every prompt (reported; the logit comparison itself feeds ids).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_PYTHON = "0.3.36"  # pinned: its vendored llama.cpp is what gets built and what converts the base
DEFAULT_CACHE = Path.home() / ".cache" / "gitlora-bench" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
DEFAULT_BASE = Path.home() / ".cache" / "gitlora-bench" / "base-de35aec4dcc58d06"
TOP1_TARGET = 0.99
EFFECT_FACTOR = 10.0

# Driver run in a subprocess: the converter with one pre-tokenizer table entry added (see the module docstring).
CONVERT_DRIVER = r"""
import ast, runpy, sys
from hashlib import sha256
llama_dir, chkhsh, pre, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
sys.path[:0] = [llama_dir, llama_dir + "/gguf-py"]
from conversion import base
source = open(base.__file__, encoding="utf-8").read()
chktxt = next(ast.literal_eval(n.value) for n in ast.walk(ast.parse(source))
              if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "chktxt" for t in n.targets))
original = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    if sha256(str(tokenizer.encode(chktxt)).encode()).hexdigest() == chkhsh:
        return pre  # the one entry convert_hf_to_gguf_update.py would have generated for this tokenizer
    return original(self, tokenizer)
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", *argv]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(command: list[str], **kwargs) -> None:
    log("$ " + " ".join("<CONVERT_DRIVER>" if c == CONVERT_DRIVER else str(c) for c in command))
    subprocess.run(command, check=True, **kwargs)


# -- 1. llama-cpp-python from the sdist ----------------------------------------------------------------------
def ensure_llama_cpp(cache: Path) -> tuple[Path, Path]:
    """(site dir with the built llama_cpp package, the sdist's vendored llama.cpp dir); built once."""
    cache.mkdir(parents=True, exist_ok=True)
    sdist = cache / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    if not sdist.exists():
        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache)])
    src = cache / "src"
    if not (src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").exists():
        tmp = Path(tempfile.mkdtemp(dir=cache, prefix=".src-"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        (tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON}").rename(src)
        shutil.rmtree(tmp, ignore_errors=True)
    site = cache / "site"
    if not (site / "llama_cpp" / "__init__.py").exists():
        log("building llama-cpp-python from its sdist (several minutes on 2 cores, once)")
        tmp = cache / "site.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        env = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF",
               "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
        run(["nice", "-n", "19", sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp),
             str(sdist)], env=env)
        # its one runtime dependency gitlora's environment lacks (numpy, jinja2, typing-extensions are there)
        run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp), "diskcache>=5.6.1"])
        shutil.rmtree(site, ignore_errors=True)
        tmp.rename(site)
    return site, src / "vendor" / "llama.cpp"


# -- 2. the base model as GGUF ---------------------------------------------------------------------------------
def llama_cpp_pre_tokenizer(tokenizer_json: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (see the module docstring), or SystemExit."""
    pre = json.loads(tokenizer_json.read_text())["pre_tokenizer"]
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise SystemExit(f"pre-tokenizer {pre} has no llama.cpp equivalent known to this script")


def convert_base(base_src: Path, work: Path, llama_dir: Path) -> tuple[Path, Path]:
    """A copy of the base (the source stays untouched) and its f32 GGUF."""
    from hashlib import sha256

    from transformers import AutoTokenizer

    base = work / "base"
    shutil.copytree(base_src, base)
    pre = llama_cpp_pre_tokenizer(base / "tokenizer.json")
    chktxt = _converter_check_text(llama_dir)
    chkhsh = sha256(str(AutoTokenizer.from_pretrained(base).encode(chktxt)).encode()).hexdigest()
    log(f"tokenizer pre-tokenizer hash {chkhsh[:16]}… registered as llama.cpp '{pre}'")
    out = work / "base-f32.gguf"
    run(["nice", "-n", "19", sys.executable, "-c", CONVERT_DRIVER, str(llama_dir), chkhsh, pre,
         str(base), "--outfile", str(out), "--outtype", "f32"])
    return base, out


def _converter_check_text(llama_dir: Path) -> str:
    """The converter's fixed check text (`chktxt = '…'` in get_vocab_base_pre), read from its source."""
    import ast

    tree = ast.parse((llama_dir / "conversion" / "base.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "chktxt" for t in node.targets):
            return ast.literal_eval(node.value)
    raise SystemExit("convert_hf_to_gguf's check text not found")


# -- 3. a trained adapter, exported by gitlora -------------------------------------------------------------------
def train_records(n: int) -> list[dict]:
    """Example records like the daemon's: one consistent refactor (unwrap -> expect) over generated Rust."""
    from gitlora.trainer import tiny

    corpus = tiny.rust_corpus(300, seed=99)[5:]
    out = []
    for i in range(n):
        body = corpus[i % len(corpus)]
        out.append(dict(repo="demo", commit=f"{i:040x}", parent=f"{i - 1:040x}", author_time=1_700_000_000 + i,
                        commit_time=1_700_000_000 + i, message=f"Replace unwrap with expect in item {i}",
                        path=f"src/m{i % 7}.rs", old_path=None, kind="fn", qualified_name=f"m{i % 7}::item_{i}",
                        change_kind="modified", before=body.replace("?;", ".unwrap();"),
                        after=body.replace("?;", '.expect("checked above");'),
                        imports=["use std::collections::HashMap;"]))
    return out


def train_adapter(base: Path, work: Path, max_steps: int) -> Path:
    """One round of gitlora's trainer (a subprocess, as the daemon runs it); returns the promoted version."""
    from gitlora.trainer import registry

    shard = work / "shards" / "000000.jsonl"
    shard.parent.mkdir(parents=True)
    shard.write_text("".join(json.dumps(r) + "\n" for r in train_records(64)))
    adapters = work / "adapters"
    spec = dict(base_model=str(base), adapters_dir=str(adapters), train_shards=[str(shard)], replay_shards=[],
                eval_shards=[], progress_file=str(work / "progress.jsonl"),
                train=dict(learning_rate=3e-3, warmup_steps=2, max_steps=max_steps, context_length=512,
                           micro_batch=1, grad_accum=2, lora_r=8, lora_alpha=16, lora_dropout=0.0, fim_share=0.3,
                           device="cpu", seed=0, fim_samples=0))
    (work / "spec.json").write_text(json.dumps(spec))
    run(["nice", "-n", "19", sys.executable, "-m", "gitlora.trainer", "--spec", str(work / "spec.json")])
    version = registry.current_version(adapters)
    if version is None:
        raise SystemExit(f"the round promoted no adapter: {(work / 'progress.jsonl').read_text()[-2000:]}")
    return adapters / version


def against_llama_cpp_converter(adapter: Path, base: Path, ours: Path, llama_dir: Path, work: Path) -> dict:
    """The same adapter through llama.cpp's own convert_lora_to_gguf.py (f32): are the LoRA tensors and the
    keys llama.cpp reads identical to gitlora's export?"""
    import gguf
    import numpy as np

    theirs = work / "adapter-convert_lora_to_gguf.gguf"
    run(["nice", "-n", "19", sys.executable, str(llama_dir / "convert_lora_to_gguf.py"), "--base", str(base),
         "--outfile", str(theirs), "--outtype", "f32", str(adapter)])
    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    keys = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha")
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    same = [n for n in ta if n in tb and ta[n].tensor_type == tb[n].tensor_type
            and list(ta[n].shape) == list(tb[n].shape) and np.array_equal(ta[n].data, tb[n].data)]
    return {"keys_equal": all(a.fields[k].contents() == b.fields[k].contents() for k in keys),
            "tensors_identical": len(same), "tensors_ours": len(ta), "tensors_theirs": len(tb)}


# -- 4. the comparison -------------------------------------------------------------------------------------------
PROMPTS = [
    "use std::collections::HashMap;\n\npub fn count_words(text: &str) -> HashMap<String, usize> {\n"
    "    let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n",
    "impl fmt::Display for Error {\n    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {\n"
    "        match self {\n            Error::Io(e) => write!(f, \"io error: {}\", e),\n",
    "pub fn read_config(path: &Path) -> Result<Config> {\n    let text = fs::read_to_string(path)?;\n"
    "    let config: Config = toml::from_str(&text)?;\n    Ok(config)\n}\n",
]
FIM = ("<fim_prefix>pub fn parse_header(bytes: &[u8]) -> Result<BlockHeader> {\n    let height = read_u64(bytes)",
       "<fim_suffix>\n    Ok(BlockHeader { height, parent, timestamp, difficulty, nonce })\n}\n<fim_middle>")


def log_softmax(x):
    import numpy as np

    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def reference(base: Path, adapter: Path, prompts: list[list[int]]):
    """transformers + peft log-probabilities, with and without the adapter, per prompt."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with_adapter, without = [], []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            with_adapter.append(log_softmax(model(x).logits[0].numpy()))
            with model.disable_adapter():
                without.append(log_softmax(model(x).logits[0].numpy()))
    return with_adapter, without


def llama_cpp_logprobs(site: Path, base_gguf: Path, lora: Path | None, prompts: list[list[int]], texts: list[str]):
    """llama.cpp's log-probabilities for the same ids, and its own tokenization of the texts."""
    sys.path.insert(0, str(site))
    from llama_cpp import Llama

    n_ctx = max(len(p) for p in prompts) + 8
    llm = Llama(model_path=str(base_gguf), lora_path=str(lora) if lora else None, logits_all=True, n_ctx=n_ctx,
                n_batch=n_ctx, n_ubatch=n_ctx, n_threads=2, seed=0, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        llm.eval(ids)
        out.append(log_softmax(llm.scores[: len(ids)].copy()))
    tokens = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
    llm.close()
    return out, tokens


def compare(a, b) -> dict:
    import numpy as np

    positions = sum(len(x) for x in a)
    agree = sum(int((x.argmax(-1) == y.argmax(-1)).sum()) for x, y in zip(a, b))
    diff = max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    return {"positions": positions, "top1_agreement": agree / positions, "max_abs_logprob_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=DEFAULT_BASE, help="a StarCoder2 model dir (read, never modified)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where llama-cpp-python is built once")
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir, removed)")
    ap.add_argument("--max-steps", type=int, default=40, help="optimizer steps of the training round")
    args = ap.parse_args()
    if not (args.base / "config.json").exists():
        raise SystemExit(f"no base model at {args.base} (bench/pretrain_tiny.py makes one; or pass --base)")
    started = time.time()
    site, llama_dir = ensure_llama_cpp(args.cache)
    work = args.work or Path(tempfile.mkdtemp(prefix="gitlora-verify-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        base, base_gguf = convert_base(args.base, work, llama_dir)
        adapter = train_adapter(base, work, args.max_steps)
        from gitlora.trainer import gguf_export

        exported = gguf_export.export_gguf(adapter, str(base), work / "adapter.gguf", version=adapter.name)
        log(f"exported {adapter.name}: {json.dumps(exported)}")
        converter = against_llama_cpp_converter(adapter, base, work / "adapter.gguf", llama_dir, work)

        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        texts = PROMPTS + ["".join(FIM)]
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        ref_lora, ref_base = reference(base, adapter, prompts)
        cpp_lora, cpp_tokens = llama_cpp_logprobs(site, base_gguf, work / "adapter.gguf", prompts, texts)
        cpp_base, _ = llama_cpp_logprobs(site, base_gguf, None, prompts, texts)

        with_adapter = compare(cpp_lora, ref_lora)
        fim = compare(cpp_lora[-1:], ref_lora[-1:])
        base_only = compare(cpp_base, ref_base)
        effect = compare(cpp_lora, cpp_base)
        ref_effect = compare(ref_lora, ref_base)
        tokenizer_agrees = sum(a == b for a, b in zip(cpp_tokens, prompts))
        report = {
            "date": time.strftime("%Y-%m-%d"), "llama_cpp_python": LLAMA_CPP_PYTHON, "base": str(args.base),
            "adapter": {k: exported[k] for k in ("architecture", "rank", "alpha", "lora_pairs")},
            "prompts": len(prompts), "llama_cpp_lora_vs_peft": with_adapter, "fim_prompt": fim,
            "llama_cpp_base_vs_transformers": base_only,
            # what the check would see if llama.cpp ignored the adapter
            "llama_cpp_without_adapter_vs_peft": compare(cpp_base, ref_lora),
            "adapter_effect_in_llama_cpp": {"top1_changed": 1 - effect["top1_agreement"],
                                            "max_abs_logprob_change": effect["max_abs_logprob_diff"]},
            "adapter_effect_in_peft": {"top1_changed": 1 - ref_effect["top1_agreement"],
                                       "max_abs_logprob_change": ref_effect["max_abs_logprob_diff"]},
            "tokenizer_agreement": f"{tokenizer_agrees}/{len(prompts)} prompts tokenized identically",
            "vs_convert_lora_to_gguf": converter,
            "seconds": round(time.time() - started, 1),
        }
        print(json.dumps(report, indent=1))
        failures = []
        if with_adapter["top1_agreement"] < TOP1_TARGET:
            failures.append(f"top-1 agreement {with_adapter['top1_agreement']:.4f} < {TOP1_TARGET}")
        if effect["max_abs_logprob_diff"] < EFFECT_FACTOR * with_adapter["max_abs_logprob_diff"]:
            failures.append("the adapter does not visibly change llama.cpp's output: largest change "
                            f"{effect['max_abs_logprob_diff']:.4g} < {EFFECT_FACTOR:g} x the largest llama.cpp-vs-peft "
                            f"difference {with_adapter['max_abs_logprob_diff']:.4g}")
        if not converter["keys_equal"] or not (converter["tensors_identical"] == converter["tensors_ours"]
                                               == converter["tensors_theirs"]):
            failures.append(f"the export differs from llama.cpp's convert_lora_to_gguf.py: {converter}")
        if tokenizer_agrees != len(prompts):
            failures.append(f"llama.cpp tokenizes {len(prompts) - tokenizer_agrees} prompts differently: the "
                            "registered pre-tokenizer is wrong")
        for failure in failures:
            print(f"FAIL: {failure}")
        if not failures:
            print(f"OK: top-1 agreement {with_adapter['top1_agreement'] * 100:.2f} % over "
                  f"{with_adapter['positions']} positions, max |Δ log p| {with_adapter['max_abs_logprob_diff']:.2e}")
        return 1 if failures else 0
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
