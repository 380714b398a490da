r"""Regenerates both papers' tables over several seeds: train, evaluate, aggregate, tabulate.

    python tools/reproduce.py --size=cpu --seeds=3 --out=results/
    python tools/reproduce.py --size=tiny --seeds=2 --only=a_lighting --out=/tmp/r --jobs=2
    python tools/reproduce.py --size=paper --seeds=5 --out=results_gpu/ --utkface=/data/UTKFace
    python tools/reproduce.py --size=cpu --dry-run          # the plan, commands and estimate

Grids (--only, comma-separated; tables and runs in tools/_reproduce_grid.py):
  a_tables       paper A Tables 1–2: attribute models trained on clean / DistortionFace /
                 NaturalFace (SE, and NaturalFace without attention or with CBAM), tested on
                 DistortionFace and NaturalFace, plus the routed method (lighting CNN → expert)
  a_lighting     paper A's lighting classifier, binary and 4-class
  b_table6       paper B Table 6(a): baseline, + augmentation, + relighting, + U-Net mask
  b_table8       paper B Table 8: no masking vs SE vs CBAM vs the U-Net mask
  b_table9       paper B Table 9: no mask vs YCbCr vs 3-conv CNN vs U-Net as the mask source
  backbone_loss  paper B's backbone × loss grid (iResNet-100 / ViT-B × ArcFace / AdaFace /
                 MagFace; Tables 4, 6(b), 7)
  b_modules      the pretrained modules themselves: relighting (PSNR / SSIM / uniformity vs
                 gamma, CLAHE, retinex) and skin segmentation (IoU / Dice vs YCbCr)

Every (run, seed) is one `python -m lowlight.main --config=configs/...` subprocess with
`--config.seed=<seed>` in its own workdir `<out>/runs/<run>/s<seed>/`, followed by
`python -m lowlight.evaluate` on it (on the early-stopping best checkpoint for paper A's
attribute models). Runs shared by several tables are trained once per seed; paper B's pretrained
relighting net and segmenters are trained once (seed 0) and feed every seed's recognition runs
(`relight_from=`, `unet_from=`, `cnn3_from=`); the routed row uses the same seed's lighting CNN and
experts. Dependencies run first; a failed run marks its dependants skipped and the rest go on.
Each subprocess's output is in `<workdir>/reproduce.log`.

Sizes:
  tiny   scale=smoke, 2 steps per run: proves the whole chain in minutes (tests use it).
  cpu    scale=cpu with a budget chosen so the default grids (all but backbone_loss) at 3 seeds
         take about an hour on a 2-core CPU (54 runs; the plan estimates ~70 min on an idle
         machine, proportionally more on a shared one): 150 steps per recognition, attribute and
         lighting run, 200 per relighting / segmentation module, warm-up 1/5 of the steps,
         paper B's modules frozen for the first quarter. The trade-off: 150 steps is an eighth
         of the main job's CPU schedule (1,200 steps, 6 min) and two epochs of paper A's CPU
         training set, so rows are compared early in training, where modules that need time
         (relighting, the mask) or attribute heads (near chance at this budget) cannot show
         what they do at convergence; the seeds measure how much of a difference is noise at
         this budget. With `--steps=N` every trained run gets N steps (the estimate scales
         with it); backbone_loss adds 15 runs (~25 min) with `--only=...`.
  paper  scale=full: the papers' sizes and schedules (for GPUs; no estimate is printed).

Outputs (`--out`): `tables.md` (the command line, git commit and date at the top; one Markdown
table per paper table with mean ± 95% CI over seeds and p-values against the baseline row; an
appendix with every run's figures), `summary.json` (the same numbers, per-seed values, t-test
statistics; NaN as null), `plots/<table>.png` (bars with CI whiskers and per-seed dots), and
`plan.json`. Statistics: tools/_reproduce_tables.py (CI = mean ± 1.96·s/√n, paper B eq. 18, s
with ddof = 1; Welch's t-test by default, `--test=student` for paper B's pooled-variance test).

Resumable: a (run, seed) that finished (its `reproduce.json` records the same training command)
is skipped with `--resume`; an interrupted run resumes from its last checkpoint. Without
`--resume` an `--out` that already holds a reproduction is refused. A JAX compilation cache
(`<out>/.jax_cache`, `--jax-cache=` to move or '' to disable) makes every seed after the first
skip XLA compilation (~30 s of each small run).
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _reproduce_grid as grid  # noqa: E402
import _reproduce_tables as tables_lib  # noqa: E402

MARKER = "reproduce.json"


@dataclasses.dataclass(frozen=True)
class Job:
    id: str                  # "<run>/s<seed>"
    run: grid.Run
    seed: int
    workdir: str
    command: tuple[str, ...]  # lowlight.main
    deps: tuple[str, ...]     # job ids
    steps: int | None
    estimate: float           # seconds (cost model of tools/_reproduce_grid.py)


def _steps(run: grid.Run, size: str, steps: int | None) -> int | None:
    if not run.train:
        return None
    return steps if steps is not None else grid.STEPS[size][run.family]


def _run_order(tables) -> list[str]:
    """Run keys the tables need, each after the runs it depends on."""
    order: list[str] = []

    def add(key):
        if key in order:
            return
        for dep in grid.RUNS[key].deps:
            add(dep.run)
        order.append(key)

    for table in tables:
        for row in table.rows:
            add(row.run)
    return order


def _command(run: grid.Run, seed: int, workdir: str, size: str, n: int | None,
             dep_dirs: dict[str, str], utkface: str, rec: str = "",
             val_targets: str = "") -> tuple[str, ...]:
    args = [run.arg, f"scale={grid.SCALE[size]}"]
    args += [f"{d.arg}={dep_dirs[d.run]}" for d in run.deps]
    if run.paper_a_data and utkface:
        args += ["data=utkface", f"root={utkface}"]
    if run.family == "recognition":  # paper B's recognition runs (lowlight.recipes.real_data)
        if rec:
            args += ["data=recordio", f"root={rec}"]
        if val_targets:
            args.append(f"val_targets={val_targets}")
    if run.config == "paper_b.py" and n:
        args.append(f"freeze_steps={max(1, n // 4)}")  # the config's quarter of the schedule
    cmd = [sys.executable, "-m", "lowlight.main",
           f"--config=configs/{run.config}:{','.join(a for a in args if a)}",
           f"--workdir={workdir}", f"--config.seed={seed}", "--config.progress=False"]
    if n:
        cmd.append(f"--config.total_steps={n}")
    if size == "tiny" and n:
        cmd += [f"--config.eval_every={n}", f"--config.ckpt_every={n}", "--config.log_every=1"]
        cmd += [f"--config.{d.tiny_override}={dep_dirs[d.run]}" for d in run.deps
                if d.tiny_override]
    if size == "cpu" and n and run.family in ("recognition", "relight", "skin_seg"):
        cmd.append(f"--config.optim.warmup_steps={n // 5}")
    return tuple(cmd)


def build_plan(grids, size: str, seeds, out: str, *, steps: int | None = None,
               utkface: str = "", rec: str = "", val_targets: str = "") -> list[Job]:
    """Jobs seed by seed (every run of seed 0, then of seed 1, ...), each after its
    dependencies: the first seed's runs fill the compilation cache for the later ones (also
    when `--jobs` runs several at once), and an interrupted reproduction has whole seeds."""
    tables = grid.tables(grids)
    jobs: list[Job] = []
    for key in _run_order(tables):
        run = grid.RUNS[key]
        n = _steps(run, size, steps)
        cost = grid.COSTS[run.family]
        est = cost["overhead"] + cost["per_step"] * (n or 0) + cost["evaluate"]
        for seed in ((0,) if run.shared else seeds):
            dep_ids = {d.run: f"{d.run}/s{0 if grid.RUNS[d.run].shared else seed}"
                       for d in run.deps}
            dep_dirs = {r: os.path.join(out, "runs", i) for r, i in dep_ids.items()}
            workdir = os.path.join(out, "runs", key, f"s{seed}")
            jobs.append(Job(f"{key}/s{seed}", run, seed, workdir,
                            _command(run, seed, workdir, size, n, dep_dirs, utkface, rec,
                                     val_targets),
                            tuple(dep_ids.values()), n, est))
    return sorted(jobs, key=lambda j: j.seed)  # stable: the run order within a seed stays


def evaluate_command(job: Job) -> list[str]:
    """`lowlight.evaluate` on the job's run: its early-stopping best checkpoint when the run
    selects "best" and that checkpoint is kept, else the latest."""
    cmd = [sys.executable, "-m", "lowlight.evaluate", f"--workdir={job.workdir}"]
    if job.run.select == "best":
        path = os.path.join(job.workdir, "early_stopping.json")
        if os.path.exists(path):
            with open(path) as f:
                best = json.load(f).get("best_step")
            if best is not None and os.path.isdir(
                    os.path.join(job.workdir, "checkpoints", str(best), "state")):
                cmd.append(f"--step={best}")
    return cmd


def finished(job: Job) -> bool:
    path = os.path.join(job.workdir, MARKER)
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("command", [None])[1:] == list(job.command[1:])


def execute(job: Job, env: dict) -> dict:
    """Trains (lowlight.main) and evaluates one job; writes its marker when both succeed."""
    os.makedirs(job.workdir, exist_ok=True)
    times = {}
    with open(os.path.join(job.workdir, "reproduce.log"), "a") as log:
        for stage, cmd in (("train", list(job.command)), ("evaluate", None)):
            cmd = cmd or evaluate_command(job)
            log.write(f"\n$ {shlex.join(cmd)}\n")
            log.flush()
            t0 = time.time()
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                check=False).returncode
            times[stage] = time.time() - t0
            if rc:
                return {"status": "failed", **times,
                        "error": f"{stage} exited with {rc}; see "
                                 f"{os.path.join(job.workdir, 'reproduce.log')}"}
    with open(os.path.join(job.workdir, MARKER), "w") as f:
        json.dump({"command": list(job.command), "evaluate": cmd, "train_seconds":
                   times["train"], "evaluate_seconds": times["evaluate"],
                   "finished": time.time()}, f, indent=1)
    return {"status": "ok", **times}


def run_jobs(jobs: list[Job], run_one, *, parallel: int = 1, on_done=None,
             finished_before: dict[str, dict] | None = None) -> dict[str, dict]:
    """Runs `run_one(job) -> {"status": "ok" | "failed", ...}` for every job, at most
    `parallel` at once, each only after its dependencies succeeded (in this call or, listed in
    `finished_before`, in an earlier one); a job whose dependency failed (or was skipped) is
    skipped. Returns {job id: result} for `finished_before` and `jobs`."""
    results: dict[str, dict] = dict(finished_before or {})
    pending = list(jobs)
    running: dict[futures.Future, Job] = {}
    with futures.ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        while pending or running:
            progressed = True
            while progressed:
                progressed = False
                for job in list(pending):
                    states = [results.get(d, {}).get("status") for d in job.deps]
                    if any(s in ("failed", "skipped") for s in states):
                        bad = [d for d, s in zip(job.deps, states) if s != "ok"]
                        results[job.id] = {"status": "skipped",
                                           "error": f"dependency {', '.join(bad)} did not finish"}
                        pending.remove(job)
                        progressed = True
                        if on_done:
                            on_done(job, results[job.id])
                    elif all(s == "ok" for s in states) and len(running) < max(1, parallel):
                        running[pool.submit(run_one, job)] = job
                        pending.remove(job)
                        progressed = True
            if not running:
                if pending:  # dependencies outside the plan: a programming error
                    raise RuntimeError(f"jobs wait for runs not in the plan: "
                                       f"{[j.id for j in pending]}")
                break
            done, _ = futures.wait(running, return_when=futures.FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                try:
                    results[job.id] = fut.result()
                except Exception as e:  # noqa: BLE001 — one broken job must not stop the rest
                    results[job.id] = {"status": "failed", "error": repr(e)}
                if on_done:
                    on_done(job, results[job.id])
    return results


# ------------------------------------------------------------------------------ CLI
def _rel(path: str) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("../..") else path


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def print_plan(jobs: list[Job], size: str, todo: set[str]) -> None:
    print(f"plan: {len(jobs)} runs at size {size!r} ({len(todo)} to run, "
          f"{len(jobs) - len(todo)} already finished)")
    for j in jobs:
        mark = " " if j.id in todo else "✓"
        est = "" if size == "paper" else f"{j.estimate / 60:5.1f}m"
        print(f" {mark} {j.id:<24} {est}  python {shlex.join(j.command[1:])}")
    if size == "paper":
        print("paper size: sized for GPUs; no time estimate")
    else:
        total = sum(j.estimate for j in jobs if j.id in todo)
        print(f"estimated {_minutes(total)} one run at a time on a 2-core CPU (cost model: "
              "tools/_reproduce_grid.py COSTS; --jobs=N overlaps runs, at most N× faster)")


def _git_commit() -> str:
    def git(*a):
        return subprocess.run(["git", "-C", REPO, *a], capture_output=True, text=True,
                              check=False).stdout.strip()

    head = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head + (" + uncommitted changes" if dirty else "")


def _budget(size: str, steps: int | None) -> str:
    if steps is not None:
        return f"{steps} training steps per run (--steps)"
    if size == "paper":
        return "the configs' full schedules (scale=full)"
    return ", ".join(f"{fam} {n}" for fam, n in grid.STEPS[size].items()) + " steps per run"


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=grid.SIZES, default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per run")
    p.add_argument("--out", default="results")
    p.add_argument("--only", default="", help=f"comma-separated grids from {', '.join(grid.GRIDS)}"
                                              " (default: every grid; at cpu size all but "
                                              "backbone_loss)")
    p.add_argument("--utkface", default="", help="UTKFace folder: paper A's runs on real data")
    p.add_argument("--rec", default="", help="insightface pack folder (train.rec/.idx): paper "
                                             "B's recognition runs train on it")
    p.add_argument("--val-targets", default="",
                   help="'+'-separated pair sets for paper B's runs, e.g. lfw+cfp_fp+agedb_30 "
                        "(names: <--rec>/<name>.bin) or .bin paths; the tables then report the "
                        "first one as stored and through the illumination protocol")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    p.add_argument("--resume", action="store_true", help="continue a reproduction in --out")
    p.add_argument("--steps", type=int, default=None, help="training steps of every run")
    p.add_argument("--test", choices=tables_lib.TESTS, default="welch")
    p.add_argument("--jax-cache", default=None, help="XLA compilation cache ('' = off)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    a = p.parse_args(argv)
    grids = [g.strip() for g in a.only.split(",") if g.strip()] or list(grid.DEFAULT_GRIDS[a.size])
    bad = [g for g in grids if g not in grid.TABLES]
    if bad:
        p.error(f"unknown grid(s) {', '.join(bad)} in --only; valid: {', '.join(grid.GRIDS)}")
    if a.seeds < 1:
        p.error("--seeds must be >= 1")
    if a.steps is not None and a.steps < 1:
        p.error("--steps must be >= 1")
    if a.utkface and not os.path.isdir(a.utkface):
        p.error(f"--utkface={a.utkface!r} is not a directory")
    if a.rec and not os.path.isfile(os.path.join(a.rec, "train.rec")):
        p.error(f"--rec={a.rec!r}: expected a folder with train.rec and train.idx")
    from lowlight.recipes import pair_set_path

    for t in filter(None, a.val_targets.split("+")):
        path = pair_set_path(t, a.rec)
        if path is None or not os.path.isfile(path):
            p.error(f"--val-targets: no pair set {path!r} for {t!r} (bare names need --rec)")
    a.grids = grids
    return a


def main(argv=None) -> int:
    from lowlight.recipes import pair_set_path

    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    out = os.path.abspath(a.out)
    seeds = list(range(a.seeds))
    utkface = os.path.abspath(a.utkface) if a.utkface else ""
    rec = os.path.abspath(a.rec) if a.rec else ""
    # bare names stay names (each run resolves them in its own root=); paths become absolute
    targets = "+".join(t if pair_set_path(t, "") is None else os.path.abspath(t)
                       for t in a.val_targets.split("+") if t)
    jobs = build_plan(a.grids, a.size, seeds, out, steps=a.steps, utkface=utkface, rec=rec,
                      val_targets=targets)
    todo = {j.id for j in jobs if not finished(j)}
    print_plan(jobs, a.size, todo)
    if a.dry_run:
        return 0

    plan_path = os.path.join(out, "plan.json")
    identity = {"size": a.size, "steps": a.steps, "utkface": utkface, "rec": rec,
                "val_targets": targets}
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            old = json.load(f)
        if not a.resume:
            print(f"error: {out} already holds a reproduction ({old.get('size')} size); pass "
                  "--resume to continue it (finished runs are skipped) or choose another --out",
                  file=sys.stderr)
            return 2
        # (plans written before --rec / --val-targets existed had neither: read as "")
        diff = [k for k in identity
                if old.get(k, "" if k in ("rec", "val_targets") else None) != identity[k]]
        if diff:
            print(f"error: --resume with different {', '.join(diff)} than the reproduction in "
                  f"{out} ({', '.join(f'{k}={old.get(k)!r}' for k in diff)})", file=sys.stderr)
            return 2
    os.makedirs(out, exist_ok=True)
    with open(plan_path, "w") as f:
        json.dump({**identity, "seeds": seeds, "grids": a.grids,
                   "jobs": {j.id: list(j.command) for j in jobs}}, f, indent=1)

    env = dict(os.environ)
    cache = os.path.join(out, ".jax_cache") if a.jax_cache is None else a.jax_cache
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")

    t_start = time.time()
    est_done = [0.0]
    remaining = [sum(j.estimate for j in jobs if j.id in todo)]
    count = [0]

    def on_done(job, res):
        count[0] += 1
        est_done[0] += job.estimate
        remaining[0] -= job.estimate
        elapsed = time.time() - t_start
        left = max(0.0, remaining[0]) * elapsed / max(est_done[0], 1e-9) / max(1, a.jobs)
        times = ", ".join(f"{k} {res[k]:.0f} s" for k in ("train", "evaluate") if k in res)
        extra = f"  {res['error']}" if res.get("error") else ""
        print(f"[{count[0]:>3}/{len(todo)}] {res['status']:<7} {job.id:<24} {times}  "
              f"(elapsed {_minutes(elapsed)}, about {_minutes(left)} left){extra}", flush=True)

    results = run_jobs([j for j in jobs if j.id in todo], lambda j: execute(j, env),
                       parallel=a.jobs, on_done=on_done,
                       finished_before={j.id: {"status": "ok", "resumed": True}
                                        for j in jobs if j.id not in todo})

    status = {jid: r["status"] for jid, r in results.items()}
    jobs_by_run: dict[str, list[Job]] = {}
    for j in jobs:
        jobs_by_run.setdefault(j.run.key, []).append(j)
    tables = tables_lib.aggregate(grid.tables(a.grids, targets.split("+")[0] if targets else ""),
                                  jobs_by_run, status, a.test)
    header = {"command": "python tools/reproduce.py " + shlex.join(argv),
              "commit": _git_commit(), "size": a.size, "seeds": seeds, "test": a.test,
              "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}",
              "budget": _budget(a.size, a.steps), "out": out,
              "data": {"utkface": utkface, "rec": rec, "val_targets": targets}}
    plot_files = tables_lib.write_plots(os.path.join(out, "plots"), tables)
    with open(os.path.join(out, "tables.md"), "w") as f:
        f.write(tables_lib.markdown(header, tables, plot_files))
    run_info = {j.id: {"workdir": j.workdir, "command": list(j.command), **results[j.id]}
                for j in jobs}
    tables_lib.write_summary(os.path.join(out, "summary.json"), header, tables, run_info)
    failed = [jid for jid, s in status.items() if s != "ok"]
    print(f"wrote {_rel(os.path.join(out, 'tables.md'))}, summary.json and plots/ "
          f"in {_minutes(time.time() - t_start)}"
          + (f"; {len(failed)} runs did not finish: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
