"""The evaluation commands: `score` and `judge` on images the user already has, `bench` over a
testbed's composition sets, and `report` on a bench folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from localora.bench.plan import DEFAULT_METHODS, DEFAULT_REFERENCE_SEEDS, METHODS
from localora.cli.options import (compile_option, complete_profiles, complete_testbeds, complete_vlms, check_ray_options, emit,
                                  json_option, ray_options, vlm_option)
from localora.scoring import judge as judging
from localora.vlm.prompts import check_dir
from localora import profiles, verbosity
from localora.errors import INTERRUPTED, LocaloraError

_image = click.Path(exists=True, dir_okay=False, path_type=Path)


def _profile_option(what: str):
    return click.option("--profile", "profile_name", default=None, shell_complete=complete_profiles,
                        help=f"Profile whose {what} (default: the default profile).")


@click.command()
@click.argument("image", type=_image)
@_profile_option("CLIP model scores")
@click.option("--prompt", required=True, help="The text prompt, for CLIP-T.")
@click.option("--reference", "references", multiple=True, type=_image, help="A reference image of a LoRA concept, for CLIP-I; repeatable.")
@click.option("--clipscore", "with_clipscore", is_flag=True, help="Also give CLIPScore x 100 (100 * 2.5 * max(cos, 0)).")
@json_option
def score(image: Path, profile_name: str | None, prompt: str, references: tuple[Path, ...], with_clipscore: bool,
          as_json: bool) -> None:
    """CLIP-T of IMAGE against --prompt, and CLIP-I against the --reference images (cosines)."""
    from localora.scoring.clip import ClipScorer
    from localora.scoring.clipscore import clipscore

    profile = profiles.load_profile(profile_name)
    scorer = ClipScorer.load(profile.clip, device=profile.device)
    t = float(scorer.clip_t(image, prompt))
    data: dict = {"image": str(image), "clip_model": profile.clip.name, "clip_t": t}
    lines = [f"CLIP-T {t:.4f}  (cosine, {profile.clip.name})" + (f"  CLIPScore {clipscore(t):.2f}" if with_clipscore else "")]
    if with_clipscore:
        data["clipscore_t"] = clipscore(t)
    if references:
        n = len(references)
        i = float(scorer.clip_i(image, references))
        data.update(clip_i=i, references=[str(r) for r in references])
        if with_clipscore:
            data["clipscore_i"] = clipscore(i)
        lines.append(f"CLIP-I {i:.4f}  (mean cosine over {n} reference image{'s' * (n > 1)})"
                     + (f"  CLIPScore {clipscore(i):.2f}" if with_clipscore else ""))
    emit(as_json, data, lines)


@click.command()
@click.argument("image_a", type=_image)
@click.argument("image_b", type=_image)
@_profile_option("VLM judges")
@vlm_option
@click.option("--element", "elements", multiple=True, required=True, help="'category (Name): trigger, words'; one per element, repeatable.")
@click.option("--repeats", default=1, show_default=True, type=int, help="Times to ask each order, with seeds seed, seed+1, ...; each answer is one outcome.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--judge-temperature", "--temperature", "temperature", default=None, type=float,
              help=f"Sampling temperature (default: greedy for one repeat, {judging.REPEAT_TEMPERATURE:g} for more).")
@click.option("--templates", "prompts_dir", default=None, type=click.Path(path_type=Path), metavar="DIR",
              help="Folder with an overriding judge.txt and/or judge_system.txt (as compose --templates).")
# The option's old name, kept so old command lines work; hidden, as compose's --prompts now names a batch.
@click.option("--prompts", "old_prompts_dir", default=None, type=click.Path(path_type=Path), hidden=True)
@json_option
def judge(image_a: Path, image_b: Path, profile_name: str | None, vlm: str | None, elements: tuple[str, ...], repeats: int, seed: int,
          temperature: float | None, prompts_dir: Path | None, old_prompts_dir: Path | None, as_json: bool) -> None:
    """Score IMAGE_A and IMAGE_B with the VLM judge (both orders, every repeat): the averaged
    scores and verdict, and win / tie / loss over the answers."""
    check_judging(repeats, temperature)
    if prompts_dir is not None and old_prompts_dir is not None:
        raise LocaloraError(f"--prompts {old_prompts_dir} is the old name of --templates; give --templates only")
    option = "--prompts" if old_prompts_dir is not None else "--templates"
    prompts_dir = check_dir(prompts_dir if old_prompts_dir is None else old_prompts_dir, option)
    parsed = [judging.parse_element(e) for e in elements]
    profile = profiles.load_profile(profile_name, vlm=vlm)
    model = _load_vlm(profile)
    result = judging.judge_pair(
        model, image_a, image_b, parsed, repeats=repeats, seed=seed, temperature=temperature, prompts_dir=prompts_dir
    )
    rates = result.rates()
    data = {"a": str(image_a), "b": str(image_b), "answers": 2 * repeats, "judge": model.identity(),
            "scores": {"a": dict(result.scores.a), "b": dict(result.scores.b)}, "verdict": dict(result.verdict),
            "outcomes": {d: {"wins": r.wins, "ties": r.ties, "losses": r.losses, "n": r.n, "win_rate": r.win_rate,
                             "interval": list(r.interval)} for d, r in rates.items()}}
    width = max(len(str(image_a)), len(str(image_b)))
    who = data["judge"]
    lines = [f"judge {who['name']} ({who['family']}): {who['source']}" + (f" @ {who['revision']}" if who["revision"] else ""),
             f"{'':{width + 3}}  " + "  ".join(f"{d:>11}" for d in judging.DIMENSIONS)]
    for tag, path, scores in (("A", image_a, result.scores.a), ("B", image_b, result.scores.b)):
        lines.append(f"{tag}  {str(path):{width}}  " + "  ".join(f"{scores[d]:>11.2f}" for d in judging.DIMENSIONS))
    verdicts = ", ".join(f"{d} {result.verdict[d]}" for d in judging.DIMENSIONS)
    lines.append(f"A vs B ({2 * repeats} answers, both orders): {verdicts}")
    for d, r in rates.items():
        lo, hi = r.interval
        lines.append(f"A vs B outcomes, {d}: {r.wins} win / {r.ties} tie / {r.losses} loss of {r.n}; "
                     f"win rate {r.win_rate:.0%} (95% Wilson {lo:.0%}-{hi:.0%})")
    emit(as_json, data, lines)


def check_judging(repeats: int, temperature: float | None) -> None:
    """--repeats and --judge-temperature, one error line each, before any model loads."""
    if repeats < 1:
        raise LocaloraError(f"--repeats {repeats}: give at least 1 (each repeat asks the judge both orders)")
    if temperature is not None and temperature < 0:
        raise LocaloraError(f"--judge-temperature {temperature:g}: give 0 (greedy) or more")


def _load_vlm(profile: profiles.Profile):
    # The one place that knows the VLM backend's entry point; weights load on the first chat.
    from localora.devices import DeviceManager
    from localora.vlm.model import VLM

    return VLM(profile.vlm, devices=DeviceManager.for_profile(profile))


def _csv(text: str, option: str, kind: type = str) -> tuple:
    try:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise LocaloraError(f"{option} {text}: expected values separated by commas, e.g. 1,2,3") from None
    if not items:
        raise LocaloraError(f"{option}: give at least one value")
    return items


@click.command()
@click.option("--testbed", required=True, shell_complete=complete_testbeds, help="A shipped testbed (tiny, composlora-anime, composlora-realistic) or a .toml file.")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help=f"Methods to run, comma-separated, of {', '.join(METHODS)} (random, cmaes and hybrid spend "
                   f"the renders reflect does, on a CLIP objective).")
@click.option("--elements", default=3, show_default=True, type=int, help="LoRAs per composition set (one character + N-1 categories).")
@click.option("--limit", default=None, type=int, help="Only the first K composition sets.")
@click.option("--seeds", default=None, help="Seeds, comma-separated (default: the testbed's, three for the shipped ones); the report gives mean ± std over seeds.")
@click.option("--judge-baseline", "baseline", default="merge", show_default=True,
              help="The method every other one is judged against; 'all' judges every pair of methods.")
@click.option("--lora-dir", default=None, type=click.Path(file_okay=False), help="Folder holding the testbed's LoRA files, by the paths the testbed names (default: the "
                   "first of $LOCALORA_LORA_DIRS and config.toml's lora_dirs that holds them all).")
@click.option("--repeats", default=1, show_default=True, type=int, help="Judge: times to ask each order; each answer is one stored outcome.")
@click.option("--judge-temperature", default=None, type=float,
              help=f"Judge: sampling temperature (default: greedy for one repeat, {judging.REPEAT_TEMPERATURE:g} for more).")
@click.option("--iterations", "-n", default=5, show_default=True, type=int, help="reflect: generate-feedback-refine rounds; random, cmaes, hybrid: N (M + 1) renders.")
@click.option("--candidates", "-c", default=5, show_default=True, type=int, help="reflect: weight vectors proposed per round (M); the others: rounds of M + 1.")
@click.option("--no-fewshot", is_flag=True, help="Ablation: also run reflect without few-shot examples, as the method "
              "reflect-nofewshot (name it in --methods to run it alone).")
@click.option("--switch-every", default=None, help="Ablation: also run Switch rotating every N steps, for each N, as "
              "methods switch-every-N (e.g. 1,3,5,10; plain switch is 5).")
@click.option("--cache-interval", type=click.IntRange(min=0), default=None,
              help="cmlora: steps between passes of every LoRA (default 2; 0 is Composite).")
@click.option("--drop-triggers", default=None, metavar="CATEGORY", help="Ablation: also run every method without this "
              "category's trigger words in the prompt (GPT4LoRA 4.4.1), as methods METHOD-drop-CATEGORY.")
@click.option("--reference-seeds", default=",".join(map(str, DEFAULT_REFERENCE_SEEDS)), show_default=True,
              help="Seeds of the single-LoRA renders CLIP-I is scored against; never a --seeds seed, so no search "
                   "has seen them.")
@click.option("--profile", "profile_name", default=None, shell_complete=complete_profiles,
              help="Profile from models.toml (default: the testbed's).")
@vlm_option
@click.option("--judges", default=None, metavar="A,B", shell_complete=complete_vlms,
              help="[vlm.NAME]s of models.toml that each judge every pair (same questions, orders, repeats and "
                   "seeds); report.md gives each one's win rates and position bias, and their agreement and "
                   "Cohen's kappa. The first one's scores fill the pair rows (default: the profile's VLM alone).")
@click.option("--out", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="Bench folder; rerun to resume.")
@click.option("--resume", is_flag=True, help="Go on with an existing bench folder only (a plain rerun also goes on; "
              "this refuses to start a new one).")
@ray_options
@click.option("--plain", is_flag=True, help="One line per finished row instead of the progress bar.")
@compile_option
@json_option
def bench(testbed: str, methods: str, elements: int, limit: int | None, seeds: str | None, baseline: str,
          lora_dir: str | None, repeats: int, judge_temperature: float | None, iterations: int, candidates: int,
          no_fewshot: bool, switch_every: str | None, cache_interval: int | None, drop_triggers: str | None, reference_seeds: str, profile_name: str | None,
          vlm: str | None, judges: str | None, out: Path,
          resume: bool, ray: str | None, workers: int | None, worker_cpus: int, plain: bool, compiled: bool,
          as_json: bool) -> None:
    """Run every method on a testbed's composition sets: CLIP-I, CLIP-T and the pairwise judge.

    Results go to OUT/bench.sqlite, one row per (set, seed, method) and one per judged pair, each
    saved as soon as it is made: rerun the same command to go on after an interruption. Runs with
    other --elements, --seeds or --methods add to the same folder. Then: localora report OUT.

    --ray spreads the rows over a Ray cluster (one worker per GPU, each keeping its models
    loaded); this process alone writes OUT, and the rows are those one process makes.
    """
    from localora.bench import runner
    from localora.bench.plan import BenchConfig
    from localora.bench.store import DB_FILE
    from localora.ui.progress import LiveProgress, PlainProgress

    cfg = BenchConfig(
        testbed=testbed, out=out, methods=_csv(methods, "--methods"), elements=elements, limit=limit,
        seeds=_csv(seeds, "--seeds", int) if seeds is not None else None, baseline=baseline, lora_dir=lora_dir,
        repeats=repeats, judge_temperature=judge_temperature, iterations=iterations, candidates=candidates, profile=profile_name,
        no_fewshot=no_fewshot, drop_triggers=drop_triggers,
        switch_every=_csv(switch_every, "--switch-every", int) if switch_every is not None else (),
        cache_interval=cache_interval, reference_seeds=_csv(reference_seeds, "--reference-seeds", int), vlm=vlm,
        judges=_csv(judges, "--judges") if judges is not None else (), compiled=compiled,
    )
    if as_json or verbosity.quiet():  # stdout is the summary alone: progress, if any, goes to stderr
        ui = PlainProgress(lambda line: None if verbosity.quiet() else click.echo(line, err=True))
    else:
        ui = PlainProgress(click.echo) if plain or not sys.stdout.isatty() else LiveProgress()
    check_ray_options(ray, workers, worker_cpus)
    if compiled and ray is not None:
        raise LocaloraError("--compile is not passed on to Ray workers; drop --compile or --ray")
    if resume and not (out / DB_FILE).is_file():
        raise LocaloraError(f"--resume {out}: no {DB_FILE} there to go on with; drop --resume to start a new bench")
    try:
        with ui:
            if ray is None:
                summary = runner.run(cfg, ui)
            else:
                from localora.bench import distributed

                summary = distributed.run(cfg, ui, ray, workers, worker_cpus)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted; finished rows are saved in {out / DB_FILE}. Rerun the same command to go on.",
                   err=True)
        sys.exit(INTERRUPTED)
    data = {"out": str(out), "store": str(out / DB_FILE), "rows_made": summary.made, "rows_skipped": summary.skipped,
            "renders": summary.renders, "cache_hits": summary.cache_hits, "vlm_calls": summary.vlm_calls}
    retried = ""
    if summary.compile_seconds:
        data["compile_warmup_seconds"] = round(summary.compile_seconds, 3)
        retried = f"; compile warm-up {summary.compile_seconds:.1f}s apart from the renders"
    if ray is not None:
        data["retried"] = summary.retried
        retried += f"; {summary.retried} rows retried after their worker died" if summary.retried else ""
    emit(as_json, data, [f"bench: {summary.made} rows made, {summary.skipped} already done; {summary.renders} renders "
                         f"({summary.cache_hits} from the cache), {summary.vlm_calls} VLM calls{retried}. Report: "
                         f"localora report {out}"])


@click.command()
@click.argument("bench_dir", type=click.Path(path_type=Path))
@click.option("--clipscore", is_flag=True, help="Also give CLIPScore x 100 (100 * 2.5 * max(cos, 0)) beside each cosine.")
def report(bench_dir: Path, clipscore: bool) -> None:
    """Write report.md and PNG plots in a bench folder: CLIP table, win / tie / loss vs the baseline."""
    from localora.bench import report as bench_report

    for path in bench_report.write(bench_dir, clipscore):
        click.echo(str(path))


@click.command("judge-agreement")
@click.argument("bench_dir", type=click.Path(path_type=Path))
@click.option("--labels", "labels_csv", required=True, type=click.Path(path_type=Path), metavar="FILE.csv",
              help="Human preferences: a header set_id,seed,method,baseline,composition,quality (any of the criteria), "
                   "then one row per pair, each criterion's winner a (the method), b (the baseline) or tie.")
@json_option
def judge_agreement(bench_dir: Path, labels_csv: Path, as_json: bool) -> None:
    """How each judge of a bench agrees with people: raw agreement and Cohen's kappa per criterion.

    Every answer the judge gave about a labelled pair (both orders, every repeat) is compared with
    that pair's label; intervals are a 95% bootstrap over pairs.
    """
    from localora.bench import labels
    from localora.bench.store import Store

    store = Store.open(bench_dir)
    given = labels.read(labels_csv, store.pairs())
    outcomes = store.outcomes()
    if not outcomes:
        raise LocaloraError(f"{bench_dir}: the bench stored no judge answers (outcomes) to compare; judge its pairs "
                            f"with `localora bench --out {bench_dir}` first")
    found = labels.compare(outcomes, given)
    data = {"bench": str(bench_dir), "labels": str(labels_csv), "pairs": len(given), "judges": {
        name: {d: {"answers": g.n, "pairs": g.pairs, "agreement": g.agreement, "kappa": g.kappa,
                   "agreement_interval": g.agreement_interval, "kappa_interval": g.kappa_interval}
               for d, g in dims.items()} for name, dims in found.items()}}
    lines = [f"{len(given)} labelled pair(s) of {bench_dir}; agreement [95% CI] | Cohen's kappa [95% CI] | answers (pairs)"]
    from localora.bench.report import agreement_cells

    lines += [f"{name:<20} {d:<12} {agreement_cells(g).replace(' | ', '  |  ')}"
              for name, dims in found.items() for d, g in dims.items()]
    emit(as_json, data, lines)


COMMANDS = [score, judge, bench, report, judge_agreement]
