"""Time TRL's DPOTrainer, our `dpo` and our `innerdpo` on identical settings, in one invocation.

    python benchmarks/bench.py                 # = make bench; ~6 min on an idle 2-core machine
    python benchmarks/bench.py --reps 4        # each half of the pairs twice: steadier medians
    python benchmarks/bench.py --reps 1 --no-epoch2 --systems trl,dpo   # quicker

Settings (every training system): SmolLM2-135M-Instruct on CPU, LoRA r=16 (alpha 16, rsLoRA,
dropout 0) on every linear layer but lm_head, batch of 4 pairs, max_length 256 (prompt ≤ 160),
the same 32 GENIES pairs of the embedded math train set, tokenised once by our pipeline (chat
template) and fed in the same fixed order to every system, AdamW lr 6e-5, gradient clip 10, no
gradient checkpointing, ``--threads`` torch threads, ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads that
spin while waiting make a 2-core machine shared with other jobs 2-3× slower and erratic; passive
waiting costs little when the machine is idle and is the same for every system).

Precision: our systems run at the run's default (``${precision:}``: bf16-mixed on a CPU with AVX512-BF16/AMX,
else 32-true; ``dpo_fp32`` forces 32-true); TRL runs twice, ``trl`` in fp32 and ``trl_bf16`` with ``bf16=True``
(HF's CPU autocast), and the faster of the two is "TRL best", the baseline of every ratio.

- TRL: ``trl.DPOTrainer`` with a peft_config (reference = disabled adapter, one concatenated forward,
  TRL's fused LM head), driven by its own training loop; the only override skips its tokenisation
  so it gets our token ids.
- dpo / innerdpo: our LightningModules through a Lightning Trainer (``training_step``, backward,
  clipping, AdamW, scheduler, CSV logging), composed from conf/ like ``python -m reprpo_pl.train``
  (innerdpo: hs collection at layers 0.5:-2, ETHER transform), reference cache on.

Each system runs in its own subprocess, so peak memory is per system: ``ru_maxrss`` of the child
(peak resident set size, what the OS charged the process: libraries, model, data, activations and
whatever the allocator keeps). Step time is wall-clock from the start of a step (Lightning
``on_train_batch_start`` / HF ``on_step_begin``) to the end of its optimiser step; the process CPU
time of the same interval (all threads) is recorded too: when other jobs take a core, wall time
grows and CPU time barely moves, so CPU-time ratios are the steadier comparison on a shared machine.

The pairs are cut into slices of (warmup + steps)·batch; in repetition r every system gets a fresh
subprocess on slice r mod (number of slices) (``--warmup`` untimed steps, then ``--steps`` timed ones;
defaults: 2 repetitions × (1 + 3) steps × 4 pairs = the 32 pairs once), and the order of the
systems rotates from one repetition to the next, so a machine whose load drifts (shared CPUs) is
seen by all systems alike. ``--interleave step`` goes further: the repetition's three subprocesses are
loaded side by side and take turns one step at a time (needs the memory of all three at once).
With the reference cache on, our systems go on into a second epoch over the same pairs, and
``epoch2_over_epoch1`` is the median step time of epoch 2 over epoch 1 on the same batches.

Against the machine's limit: ``gemm`` times ``torch.matmul`` at the model's linear shapes in fp32 and bf16 (the
``--threads`` threads) and takes the best rate per dtype as the peak; each training system's model FLOPs per
second, counted from each step's real tokens T (prompt + chosen and prompt + rejected, no padding) as
``(6·N + 2·N_lora)·T`` (forward of policy and reference 2·N·T each, backward 2·N·T for the frozen weights'
input gradients, 2·N_lora·T for the adapter's weight gradients; N = the matmul weights, lm_head included), is
reported as a fraction of its dtype's peak. The same count is used for every system (ours scores only
completion positions against the vocabulary and encodes each prompt once, so it does less arithmetic than
it is credited with: the fraction measures useful work per second, not kernel efficiency). ``eval`` scores
base and adapter on the default run's targets (``eval.n_samples`` pairs each) under the run's precision and in
fp32 with batches in eval-set order (the evaluation when issue 13 was filed), and reports pairs per second of each.
``default_run`` times ``python -m reprpo_pl.train`` with no overrides, as a user runs it (the GGUF already converted,
an empty base-score cache, the OpenMP wait policy left at its default): wall and CPU seconds, and its own timing.

Writes ``benchmarks/results/<date>-<machine>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TRAINING = ("trl", "trl_bf16", "dpo", "innerdpo", "dpo_fp32")  # systems timed step by step
SYSTEMS = (*TRAINING, "gemm", "eval", "default_run")  # + GEMM peak, eval throughput and the default run, one measurement each
DEFAULT_SYSTEMS = ("trl", "trl_bf16", "dpo", "innerdpo", "gemm", "eval", "default_run")
ONCE = ("gemm", "eval", "default_run")  # systems measured once, not step by step
TRL_SYSTEMS = ("trl", "trl_bf16")
PROTOCOL_FD_ENV = "REPRPO_BENCH_FD"


# ---- parent -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                   help=f"comma list of {', '.join(SYSTEMS)} (dpo_fp32: our dpo forced to 32-true)")
    p.add_argument("--reps", type=int, default=2, help="repetitions, each with fresh processes (and the next slice of the pairs)")
    p.add_argument("--pairs", type=int, default=32, help="distinct training pairs, split into slices of (warmup + steps)·batch")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per repetition")
    p.add_argument("--steps", type=int, default=3, help="timed steps per repetition (epoch 1 = warmup + steps batches)")
    p.add_argument("--no-epoch2", dest="epoch2", action="store_false", help="skip the second (cached) epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help="OMP_WAIT_POLICY of every child ('' = inherit): PASSIVE keeps timings stable when other jobs share the CPUs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--max-prompt-length", type=int, default=160)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--interleave", choices=("rep", "step"), default="rep",
                   help="rep: one subprocess at a time, order rotated per repetition; step: all loaded, one step each in turn")
    p.add_argument("--profile", default="dpo",
                   help="comma list of training systems to profile afterwards, one epoch-1 step each (torch.profiler, own "
                        "subprocess; tables in results/, top three costs in the JSON); '' = none")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--machine", default=platform.node() or "machine", help="machine name for the results file")
    p.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    p.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--profile-only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


class Child:
    """One system's subprocess: a line protocol on a dedicated pipe (its stdout/stderr go to a log file)."""

    def __init__(self, system: str, rep: int, args: argparse.Namespace, log_dir: Path, profile: bool = False):
        self.system, self.rep = system, rep
        read_fd, write_fd = os.pipe()
        env = {**os.environ, PROTOCOL_FD_ENV: str(write_fd), "TOKENIZERS_PARALLELISM": "false"}
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
        if args.omp_wait_policy:
            env["OMP_WAIT_POLICY"] = args.omp_wait_policy
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", system, "--rep", str(rep), *child_flags(args)]
        cmd += ["--profile-only"] if profile else []
        self.log_path = log_dir / f"{system}-{rep}{'-profile' if profile else ''}.log"
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
            pass_fds=(write_fd,), text=True, cwd=ROOT, env=env,
        )
        os.close(write_fd)
        self.messages = os.fdopen(read_fd, "r")
        self.steps: list[dict[str, Any]] = []
        self.final: dict[str, Any] = {}

    def receive(self) -> dict[str, Any]:
        line = self.messages.readline()
        if not line:
            tail = self.log_path.read_text()[-3000:]
            raise RuntimeError(f"bench child {self.system} exited (rc={self.proc.wait()}); log tail:\n{tail}")
        return json.loads(line)

    def next_event(self) -> dict[str, Any]:
        """Wait for the child's next message: 'ready' (at the gate before a step) or 'done'."""
        message = self.receive()
        if message["event"] == "done":
            self.final = message
            self.proc.wait()
        return message

    def step(self) -> dict[str, Any]:
        """Let the child run one step (it is at the gate); return its timing message."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        message = self.receive() | {"rep": self.rep}
        self.steps.append(message)
        return message


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--reps", str(args.reps), "--pairs", str(args.pairs), "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--max-prompt-length", str(args.max_prompt_length), "--lora-r", str(args.lora_r)]
    return flags + ([] if args.epoch2 else ["--no-epoch2"]) + ["--out", str(args.out), "--machine", args.machine]


def run_parent(args: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}: use {', '.join(SYSTEMS)}")
    started = time.time()
    load_start = os.getloadavg()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: no orphaned children
    log_dir = Path(tempfile.mkdtemp(prefix="reprpo-bench-"))
    print(f"bench: {systems}, interleave={args.interleave}, child logs in {log_dir}", flush=True)
    children: list[Child] = []
    training = [s for s in systems if s in TRAINING]
    try:
        for rep in range(args.reps if training else 0):
            run_repetition(args, rotate(training, rep), rep, children, log_dir)
        for s in (s for s in systems if s not in TRAINING):  # one measurement each, after the training systems
            child = Child(s, 0, args, log_dir)
            children.append(child)
            while child.next_event()["event"] == "ready":
                child.step()
            print(f"  {s}: {child.final.get('summary')}", flush=True)
        for s in (s for s in args.profile.split(",") if s in training):
            child = Child(s, 0, args, log_dir, profile=True)
            children.append(child)
            while child.next_event()["event"] == "ready":
                child.step()  # not part of the timings: only the profile it writes and its top costs
            print(f"  profiled {s}: {child.final.get('profile')}", flush=True)
    finally:
        for child in children:
            if child.proc.poll() is None:
                child.proc.kill()
    shutil.rmtree(log_dir, ignore_errors=True)  # kept only when a child failed (the error shows its log)
    return summarise(args, systems, children, load_start, time.time() - started)


def rotate(items: list[str], k: int) -> list[str]:
    k %= len(items)
    return items[k:] + items[:k]


def run_repetition(args: argparse.Namespace, order: list[str], rep: int, children: list[Child], log_dir: Path) -> None:
    """One repetition: each system's subprocess in turn (rep), or all of them taking turns per step (step)."""
    if args.interleave == "rep":
        for s in order:
            child = Child(s, rep, args, log_dir)
            children.append(child)
            while child.next_event()["event"] == "ready":
                report_step(child.step())
        return
    batch = {s: Child(s, rep, args, log_dir) for s in order}
    children.extend(batch.values())
    pending = {s: c.next_event() for s, c in batch.items()}  # all loaded and at the gate
    round_ = 0
    while any(m["event"] == "ready" for m in pending.values()):
        for s in rotate(order, round_):
            if pending[s]["event"] == "ready":
                report_step(batch[s].step())
                pending[s] = batch[s].next_event()
        round_ += 1


def report_step(m: dict[str, Any]) -> None:
    tag = f"epoch {m['epoch'] + 1}" + ("" if m["timed"] else ", warm-up position")
    print(f"  rep {m['rep']} {m['system']:>8} step {m['step']:>2} ({tag}): {m['seconds']:6.2f} s   load {m['loadavg'][0]:.2f}", flush=True)


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(args: argparse.Namespace, systems: list[str], children: list[Child], load_start: tuple, wall: float) -> dict[str, Any]:
    per_epoch = args.warmup + args.steps
    out: dict[str, Any] = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": args.machine,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": native_bf16(),
        "versions": versions(),
        "settings": {
            "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised)", "device": "cpu",
            "precision": "ours: the run's default (${precision:}); dpo_fp32: 32-true; trl: fp32; trl_bf16: bf16=True",
            "lora": {"r": args.lora_r, "alpha": 16, "rslora": True, "dropout": 0.0, "targets": "all-linear"},
            "batch_pairs": args.batch_size, "max_length": args.max_length, "max_prompt_length": args.max_prompt_length,
            "pairs": args.pairs, "repetitions": args.reps, "pairs_per_rep": per_epoch * args.batch_size, "data": "embedded GENIES math/train, our tokenisation (chat template)",
            "threads": args.threads, "omp_wait_policy": args.omp_wait_policy or os.environ.get("OMP_WAIT_POLICY"),
            "warmup_steps_per_rep": args.warmup, "timed_steps_per_rep": args.steps,
            "gradient_checkpointing": False, "interleave": args.interleave,
            "memory": "peak RSS = ru_maxrss of each system's own subprocess (whole process: libraries, model, data)",
            "innerdpo": "collection hs, layers 0.5:-2, transform ether, loss innerdpo defaults",
            "model_flops": "(6·N + 2·N_lora)·T per step, T = real tokens of prompt+chosen and prompt+rejected",
        },
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "wall_seconds": round(wall, 1),
        "systems": {},
    }
    finals_of = {s: [c.final for c in children if c.system == s and c.final and "--profile-only" not in c.proc.args]
                 for s in systems}
    gemm = (finals_of.get("gemm") or [{}])[0].get("summary")
    for s in (s for s in systems if s in TRAINING):
        runs = [c for c in children if c.system == s and "--profile-only" not in c.proc.args]
        steps = [m for c in runs for m in c.steps]
        timed1 = [m for m in steps if m["epoch"] == 0 and m["timed"]]
        epoch1, epoch1_cpu = [m["seconds"] for m in timed1], [m["cpu_seconds"] for m in timed1]
        timed = {(m["rep"], m["position"]) for m in timed1}
        epoch2 = [m["seconds"] for m in steps if m["epoch"] == 1 and (m["rep"], m["position"]) in timed]
        epoch2_cpu = [m["cpu_seconds"] for m in steps if m["epoch"] == 1 and (m["rep"], m["position"]) in timed]
        median = median_or_none(epoch1)
        finals = finals_of[s]
        entry = {
            "precision": finals[0].get("precision") if finals else None,
            "median_step_s": median,
            "pairs_per_s": args.batch_size / median if median else None,
            "median_step_cpu_s": median_or_none(epoch1_cpu),
            "peak_rss_gb": max((f["peak_rss_gb"] for f in finals), default=None),
            "rss_before_first_step_gb": max((f["rss_before_first_step_gb"] for f in finals), default=None),
            "peak_rss_gb_per_rep": [f["peak_rss_gb"] for f in finals],
            "step_s": [round(m["seconds"], 3) for m in steps],
            "step_cpu_s": [round(m["cpu_seconds"], 3) for m in steps],
            "step_tokens": [m.get("tokens") for m in steps],
            "step_rep": [m["rep"] for m in steps],
            "step_epoch": [m["epoch"] for m in steps],
            "step_timed": [m["timed"] for m in steps],
            "step_loadavg_1min": [round(m["loadavg"][0], 2) for m in steps],
            "ref_cache": [f.get("ref_cache") for f in finals] if s not in TRL_SYSTEMS else None,
        }
        if finals and timed1 and all(m.get("tokens") for m in timed1):
            n, n_lora = finals[0]["matmul_params"], finals[0]["lora_params"]
            rates = [(6 * n + 2 * n_lora) * m["tokens"] / m["seconds"] for m in timed1]
            entry["model_flops_per_s"] = statistics.median(rates)
            dtype = "bf16" if str(entry["precision"]).startswith("bf16") else "fp32"
            if gemm and gemm.get(f"peak_{dtype}_flops_per_s"):
                entry["peak_fraction"] = entry["model_flops_per_s"] / gemm[f"peak_{dtype}_flops_per_s"]
                entry["peak_dtype"] = dtype
        if epoch2:
            entry["epoch2_median_step_s"] = statistics.median(epoch2)
            entry["epoch2_over_epoch1"] = statistics.median(epoch2) / median
            entry["epoch2_median_step_cpu_s"] = statistics.median(epoch2_cpu)
            entry["epoch2_over_epoch1_cpu"] = statistics.median(epoch2_cpu) / entry["median_step_cpu_s"]
        profiled = [c.final for c in children if c.system == s and c.final and "--profile-only" in c.proc.args]
        if profiled:
            entry["profile"], entry["top_costs"] = profiled[0].get("profile"), profiled[0].get("top_costs")
        out["systems"][s] = entry
    sys_ = out["systems"]
    out["gemm"] = gemm
    out["eval"] = (finals_of.get("eval") or [{}])[0].get("summary")
    out["default_run"] = (finals_of.get("default_run") or [{}])[0].get("summary")
    trl = [s for s in TRL_SYSTEMS if sys_.get(s, {}).get("median_step_s")]
    best = min(trl, key=lambda s: sys_[s]["median_step_s"]) if trl else None
    out["trl_best"] = best

    def ratio(a: str | None, b: str | None, key: str = "median_step_s") -> float | None:
        if a in sys_ and b in sys_ and sys_[a].get(key) and sys_[b].get(key):
            return sys_[a][key] / sys_[b][key]
        return None

    out["dpo_vs_trl_best"] = ratio("dpo", best)
    out["innerdpo_vs_dpo"] = ratio("innerdpo", "dpo")
    out["innerdpo_vs_trl_best"] = ratio("innerdpo", best)
    out["dpo_vs_dpo_fp32"] = ratio("dpo", "dpo_fp32")
    out["trl_bf16_vs_trl"] = ratio("trl_bf16", "trl")
    # process CPU time per step (all threads): less sensitive than wall time to other jobs on a shared machine
    out["dpo_vs_trl_best_cpu"] = ratio("dpo", best, "median_step_cpu_s")
    out["innerdpo_vs_dpo_cpu"] = ratio("innerdpo", "dpo", "median_step_cpu_s")
    out["rss_vs_trl"] = ratio("dpo", best, "peak_rss_gb")
    out["innerdpo_rss_vs_trl"] = ratio("innerdpo", best, "peak_rss_gb")
    out["epoch2_vs_epoch1"] = sys_.get("dpo", {}).get("epoch2_over_epoch1")
    out["epoch2_over_epoch1"] = {s: sys_[s].get("epoch2_over_epoch1") for s in sys_ if s not in TRL_SYSTEMS}
    out["dpo_peak_fraction"] = sys_.get("dpo", {}).get("peak_fraction")
    out["eval_pairs_per_s"] = (out["eval"] or {}).get("pairs_per_s")
    out["eval_pairs_per_s_fp32"] = (out["eval"] or {}).get("pairs_per_s_fp32")
    out["eval_speedup_vs_fp32"] = (out["eval"] or {}).get("speedup_vs_fp32")
    out["default_run_s"] = (out["default_run"] or {}).get("wall_s")

    def within(key: str, limit: float, above: bool = False) -> bool | None:
        value = out.get(key)
        return None if value is None else (value >= limit if above else value <= limit)

    out["targets"] = {
        "dpo_vs_trl_best <= 0.30": within("dpo_vs_trl_best", 0.30),
        "innerdpo_vs_dpo <= 1.10": within("innerdpo_vs_dpo", 1.10),
        "epoch2_vs_epoch1 <= 0.70": within("epoch2_vs_epoch1", 0.70),
        "rss_vs_trl <= 0.70": within("rss_vs_trl", 0.70),
        "dpo_peak_fraction >= 0.35": within("dpo_peak_fraction", 0.35, above=True),
        "eval_speedup_vs_fp32 >= 2": within("eval_speedup_vs_fp32", 2.0, above=True),
        "default_run_s <= 150": within("default_run_s", 150.0),
    }
    return out


def table(result: dict[str, Any]) -> str:
    sys_ = result["systems"]
    base = sys_.get(result.get("trl_best") or "", {})

    def x(value: float | None, ref: float | None) -> str:
        return f"{value / ref:.2f}×" if value and ref else "–"

    def f(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "–"

    lines = [
        f"| system | precision | s/step (median) | × TRL best ({result.get('trl_best')}) | pairs/s | CPU s/step | peak RSS (GB) "
        "| × TRL best | model GFLOP/s | of peak | epoch-2 s/step | epoch 2 / epoch 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in sys_.items():
        flops = s.get("model_flops_per_s")
        lines.append(
            f"| {name} | {s.get('precision')} | {f(s['median_step_s'], '.2f')} | {x(s['median_step_s'], base.get('median_step_s'))} "
            f"| {f(s['pairs_per_s'], '.3f')} | {f(s['median_step_cpu_s'], '.1f')} "
            f"| {f(s['peak_rss_gb'], '.2f')} | {x(s['peak_rss_gb'], base.get('peak_rss_gb'))} "
            f"| {f(flops / 1e9 if flops else None, '.1f')} | {f(s.get('peak_fraction'), '.2f')} "
            f"| {f(s.get('epoch2_median_step_s'), '.2f')} | {f(s.get('epoch2_over_epoch1'), '.2f')} |"
        )
    keys = ("dpo_vs_trl_best", "innerdpo_vs_dpo", "epoch2_vs_epoch1", "rss_vs_trl", "dpo_peak_fraction",
            "eval_pairs_per_s", "eval_pairs_per_s_fp32", "default_run_s", "dpo_vs_trl_best_cpu", "innerdpo_vs_dpo_cpu")
    ratios = ", ".join(f"{k} = {result[k]:.3f}" for k in keys if result.get(k) is not None)
    gemm = result.get("gemm") or {}
    peaks = ", ".join(f"{d} {gemm[f'peak_{d}_flops_per_s'] / 1e9:.0f}" for d in ("fp32", "bf16") if gemm.get(f"peak_{d}_flops_per_s"))
    load = f"load average {result['loadavg_start'][0]:.2f} → {result['loadavg_end'][0]:.2f} (1 min)"
    return ("\n".join(lines) + f"\n\n{ratios}\nGEMM peak GFLOP/s: {peaks or '–'}; {load}; {result['cpu']}, "
            f"{result['settings']['threads']} threads")


def native_bf16() -> bool:
    from reprpo_pl.models.precision import BF16_CPU_FLAGS, cpu_flags

    return any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "lightning", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "missing"
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        run_child(args)
        return
    result = run_parent(args)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.machine)
    path = args.out / f"{dt.date.today().isoformat()}-{machine}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print("\n" + table(result))
    print(f"\ntargets: {result['targets']}")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


# ---- child --------------------------------------------------------------------------------------


class Gate:
    """The child's side of the protocol: 'ready' then wait for 'go' before a step; timing after it."""

    def __init__(self, system: str, warmup: int, steps_per_epoch: int, total_steps: int, profile_to: Path | None = None):
        self.system, self.warmup, self.per_epoch, self.total = system, warmup, steps_per_epoch, total_steps
        self.tokens: list[int] = []  # real tokens of each position's batch (`step_tokens`), set once the pairs are known
        self.profile_to = profile_to  # profile the last step (an epoch-1 step after the warm-up) into this file
        self.profiler = None
        self.top_costs: list[str] = []  # the profiled step's three largest self-CPU operators
        self.out = os.fdopen(int(os.environ[PROTOCOL_FD_ENV]), "w", buffering=1)
        self.count = 0
        self.rss_before: float | None = None
        self.started = self.cpu_started = 0.0

    def send(self, **message: Any) -> None:
        self.out.write(json.dumps(message) + "\n")

    def begin(self) -> None:
        if self.rss_before is None:
            import psutil

            self.rss_before = psutil.Process().memory_info().rss / 1e9
        self.send(event="ready")
        if sys.stdin.readline().strip() != "go":
            raise SystemExit("bench parent went away")
        if self.profile_to is not None and self.count == self.total - 1:
            from torch.profiler import ProfilerActivity, profile

            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
        self.started, self.cpu_started = time.perf_counter(), time.process_time()

    def end(self) -> None:
        seconds, cpu = time.perf_counter() - self.started, time.process_time() - self.cpu_started
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profile_to.parent.mkdir(parents=True, exist_ok=True)
            events = self.profiler.key_averages()
            total = sum(e.self_cpu_time_total for e in events) / 1e6
            phases = "".join(f"{e.key}: {e.cpu_time_total / 1e6:.2f} s of the profiled {total:.2f} s\n"
                             for e in events if e.key.startswith("reprpo_pl."))
            table = events.table(sort_by="self_cpu_time_total", row_limit=25)
            top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:3]
            self.top_costs = [f"{e.key}: {e.self_cpu_time_total / 1e6 / total:.0%} of self CPU time" for e in top]
            self.profile_to.write_text(f"{self.system}: one epoch-1 step (reference forward included), {seconds:.2f} s wall\n{phases}{table}")
            self.profiler = None
        epoch, position = divmod(self.count, self.per_epoch)
        self.send(event="step", system=self.system, step=self.count, epoch=epoch, position=position,
                  timed=position >= self.warmup, seconds=seconds, cpu_seconds=cpu, loadavg=os.getloadavg(),
                  tokens=self.tokens[position] if position < len(self.tokens) else None)
        self.count += 1

    def done(self, **extra: Any) -> None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux → GB
        self.send(event="done", peak_rss_gb=round(peak, 3), rss_before_first_step_gb=round(self.rss_before or 0, 3),
                  top_costs=self.top_costs, **extra)


def bench_config(system: str, args: argparse.Namespace, epochs: int):
    from hydra import compose, initialize_config_module

    from reprpo_pl.config import CONF_MODULE

    method = {"trl": "dpo", "trl_bf16": "dpo", "dpo_fp32": "dpo"}.get(system, system)
    transform = ["transform=ether"] if method != "dpo" else []  # only ReprPO methods have a transform
    overrides = [
        f"method={method}", *transform, "model=smollm2_135m", "dataset=math",
        f"adapter.r={args.lora_r}", "adapter.lora_alpha=16", "adapter.lora_dropout=0.0",
        f"data.n_train={2 * args.pairs}",  # spare rows: tokenisation drops a few
        f"data.batch_size={args.batch_size}",
        f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_prompt_length}",
        "method.lr=6e-5", f"trainer.max_epochs={epochs}", "ref_cache.enabled=true",
        *(["trainer.precision=32-true"] if system == "dpo_fp32" else []),
    ]
    with initialize_config_module(config_module=CONF_MODULE, version_base="1.3"):
        return compose("train", overrides=overrides)


def bench_pairs(cfg, tokenizer, args: argparse.Namespace):
    """This repetition's pairs: the first ``--pairs`` training pairs that survive our tokenisation, in one
    fixed shuffled order (the same for every system), cut into slices of (warmup+steps)·batch; repetition
    r takes slice r mod (number of slices)."""
    import torch

    from reprpo_pl.data.datamodule import PreferenceDataModule

    dm = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
    dm.tokenizer = tokenizer
    dm.setup()
    order = torch.randperm(len(dm.train_set), generator=torch.Generator().manual_seed(0)).tolist()
    per_rep = (args.warmup + args.steps) * args.batch_size
    if args.pairs % per_rep:
        raise SystemExit(f"--pairs={args.pairs} must be a multiple of (warmup + steps)·batch = {per_rep}")
    if len(order) < args.pairs:
        raise SystemExit(f"only {len(order)} pairs survive tokenisation, {args.pairs} needed: raise --max-length")
    start = (args.rep % (args.pairs // per_rep)) * per_rep
    return dm, dm.train_set.select(order[start : start + per_rep])


def run_child(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    os.dup2(2, 1)  # library prints go to the log, never into the protocol
    per_epoch = args.warmup + args.steps
    epochs = 2 if args.epoch2 and args.child not in TRL_SYSTEMS else 1
    profile_to = None
    if args.profile_only:  # warm-up steps, then one profiled step; no second epoch
        epochs = 1
        per_epoch = args.warmup + 1
        machine = re.sub(r"[^A-Za-z0-9_.-]+", "-", args.machine)
        profile_to = args.out / f"{dt.date.today().isoformat()}-{machine}-profile-{args.child}.txt"
    gate = Gate(args.child, args.warmup, per_epoch, per_epoch * epochs, profile_to)
    if args.child in ONCE:
        if args.child == "default_run":
            summary = default_run()
        else:
            cfg = bench_config("dpo", args, 1)
            summary = gemm_peak(args.threads) if args.child == "gemm" else eval_throughput(cfg)
        gate.done(summary=summary)
        return
    cfg = bench_config(args.child, args, epochs)
    if args.child in TRL_SYSTEMS:
        extra = run_trl(cfg, args, gate, per_epoch, bf16=args.child == "trl_bf16")
    else:
        extra = run_ours(cfg, args, gate, epochs)
    gate.done(**extra, profile=str(profile_to) if profile_to else None)


def step_tokens(train, batch_size: int) -> list[int]:
    """Real tokens of each batch of ``train`` in order: per pair |prompt|+|chosen| + |prompt|+|rejected|."""
    per_pair = [2 * len(p) + len(c) + len(r) for p, c, r in zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"])]
    return [sum(per_pair[i : i + batch_size]) for i in range(0, len(per_pair), batch_size)]


def param_counts(model) -> dict[str, int]:
    """``matmul_params``: weights of the frozen linear layers (lm_head included, LoRA excluded); ``lora_params``."""
    from torch import nn

    frozen = sum(m.weight.numel() for name, m in model.named_modules()
                 if isinstance(m, nn.Linear) and "lora_" not in name)
    lora = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return {"matmul_params": frozen, "lora_params": lora}


def gemm_peak(threads: int) -> dict[str, Any]:
    """Best ``torch.matmul`` rate per dtype over SmolLM2-135M's linear shapes (d 576, MLP 1536, kv 192, and the
    vocabulary 49152) with M = 1024 rows (a step's tokens), each timed as the best of 5 runs after a warm-up."""
    import torch

    torch.set_num_threads(threads)
    shapes = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
    rows, out = 1024, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {}
        for k, n in shapes:
            a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            reps = max(1, int(2e9 // (2 * rows * k * n)))  # ~2 GFLOP per timing
            torch.matmul(a, b)
            best = float("inf")
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(reps):
                    torch.matmul(a, b)
                best = min(best, (time.perf_counter() - start) / reps)
            rates[f"{rows}x{k}x{n}"] = 2 * rows * k * n / best
        out[f"{name}_flops_per_s"] = rates
        out[f"peak_{name}_flops_per_s"] = max(rates.values())
    return out


def eval_throughput(cfg) -> dict[str, Any]:
    """Pairs per second of scoring base and adapter (as a run's shift evaluation does) on the default run's
    targets: as a run does now (its default precision, `eval_batches`' length-ordered batches) and as it did
    when issue 13 was filed (fp32, batches in eval-set order): the module of ``cfg`` (untrained adapter), the
    targets' ``eval.n_samples`` pairs each, ``eval.batch_size``, the packed layout."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    from reprpo_pl.data.datamodule import PreferenceDataModule
    from reprpo_pl.eval.scorer import score_pairs
    from reprpo_pl.models.precision import default_precision, precision_context

    out: dict[str, Any] = {"precision": default_precision()}
    for key, precision in (("fp32", "32-true"), ("default", default_precision())):
        # each precision builds its own module: under bf16-mixed the frozen base is stored in bf16
        module = get_class(cfg.method._target_)(OmegaConf.merge(cfg, {"trainer": {"precision": precision}}))
        dm = PreferenceDataModule(cfg.data, cfg.dataset, cfg.eval)
        dm.tokenizer = module.tokenizer
        dm.setup()
        if key == "fp32":
            loaders = [DataLoader(pairs, batch_size=dm.eval_batch_size, collate_fn=dm.collator) for pairs in dm.eval_sets.values()]
        else:
            loaders = [dm.eval_dataloader(target) for target in dm.eval_sets]
        pairs = sum(len(loader.dataset) for loader in loaders)
        out |= {"pairs": pairs, "targets": len(loaders)}
        with precision_context(precision, "cpu"):
            score_pairs(module.model, loaders[0], desc="warm-up")  # first-call costs out of the timing
        start = time.perf_counter()
        with precision_context(precision, "cpu"):
            for loader in loaders:
                score_pairs(module.model, loader)
        seconds = time.perf_counter() - start
        out[f"seconds_{key}"] = seconds
        out["pairs_per_s" if key == "default" else "pairs_per_s_fp32"] = pairs / seconds
    out["speedup_vs_fp32"] = out["pairs_per_s"] / out["pairs_per_s_fp32"]
    out["baseline"] = "fp32, batches in eval-set order: the evaluation when issue 13 was filed"
    return out


def default_run() -> dict[str, Any]:
    """``python -m reprpo_pl.train`` with no overrides in a temporary run dir and an empty base-score cache: its wall
    and CPU seconds (the process and its threads) and the run's own ``timing`` (training and evaluation)."""
    from reprpo_pl.eval.base_cache import CACHE_ENV

    with tempfile.TemporaryDirectory(prefix="reprpo-bench-default-") as tmp:
        env = {k: v for k, v in os.environ.items() if k not in (PROTOCOL_FD_ENV, "OMP_WAIT_POLICY")}
        env[CACHE_ENV] = str(Path(tmp) / "base_scores")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "reprpo_pl.train", f"hydra.run.dir={Path(tmp) / 'run'}"],
                              cwd=tmp, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise SystemExit(f"the default run failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        timing = json.loads((Path(tmp) / "run" / "results.json").read_text())["timing"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"command": "python -m reprpo_pl.train", "base_score_cache": "empty", "wall_s": round(wall, 1),
            "cpu_s": round(cpu, 1), "train_s": timing.get("train_s"), "eval_s": timing.get("eval_s")}


def run_ours(cfg, args: argparse.Namespace, gate: Gate, epochs: int) -> dict[str, Any]:
    import lightning as L
    from hydra.utils import get_class, instantiate
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    L.seed_everything(cfg.seed, workers=True)
    module = get_class(cfg.method._target_)(cfg)
    dm, train = bench_pairs(cfg, module.tokenizer, args)
    gate.tokens = step_tokens(train, args.batch_size)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=False, collate_fn=dm.collator)
    if gate.profile_to is not None:
        loader = DataLoader(train.select(range(gate.total * args.batch_size)), batch_size=args.batch_size,
                            shuffle=False, collate_fn=dm.collator)

    class Timing(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            gate.begin()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            gate.end()

    tmp = tempfile.mkdtemp(prefix=f"bench-{args.child}-")
    trainer = instantiate(
        cfg.trainer, default_root_dir=tmp, callbacks=[Timing()], logger=CSVLogger(tmp), enable_checkpointing=False,
        enable_progress_bar=False, max_epochs=epochs, max_steps=gate.total,
    )
    trainer.fit(module, train_dataloaders=loader)
    shutil.rmtree(tmp, ignore_errors=True)
    cache = module.ref_cache
    return {"ref_cache": None if cache is None else {"hits": cache.hits, "misses": cache.misses, "examples": len(cache), "bytes": cache.nbytes},
            "precision": str(trainer.precision), **param_counts(module.model)}


def run_trl(cfg, args: argparse.Namespace, gate: Gate, per_epoch: int, bf16: bool) -> dict[str, Any]:
    import torch
    import trl
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    from reprpo_pl.models.loading import convert_gguf

    folder = convert_gguf(cfg.model.name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    _, train = bench_pairs(cfg, tokenizer, args)
    train = train.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    gate.tokens = step_tokens(train, args.batch_size)

    class OurTokens(trl.DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenised by our pipeline: identical token ids for every system

    class Timing(TrainerCallback):
        def on_step_begin(self, args_, state, control, **kwargs):
            gate.begin()

        def on_step_end(self, args_, state, control, **kwargs):
            gate.end()

    tmp = tempfile.mkdtemp(prefix="bench-trl-")
    config = trl.DPOConfig(
        output_dir=tmp, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=1,
        max_steps=gate.total, learning_rate=float(cfg.method.lr),
        lr_scheduler_type="cosine", warmup_steps=0.1, max_grad_norm=10.0, weight_decay=0.0,
        beta=0.1, loss_type=["sigmoid"], max_length=args.max_length, bf16=bf16, use_cpu=True,
        gradient_checkpointing=False, logging_steps=1, save_strategy="no", report_to=[], dataloader_num_workers=0,
        train_sampling_strategy="sequential", seed=int(cfg.seed), disable_dropout=True,
    )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=16, use_rslora=True, lora_dropout=0.0,
                      target_modules="all-linear")
    trainer = OurTokens(model=model, args=config, processing_class=tokenizer, train_dataset=train, peft_config=lora,
                        callbacks=[Timing()])
    trainer.train()
    shutil.rmtree(tmp, ignore_errors=True)
    return {"precision": "bf16 autocast" if bf16 else "fp32", **param_counts(trainer.model)}


if __name__ == "__main__":
    main()
