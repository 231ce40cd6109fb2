"""The pairwise judge: prompt, position debiasing and win/tie/loss aggregation.

The answer source here is scripted: the answers are the input under test, the judge is real.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from localora.scoring import judge
from localora.vlm import schemas
from localora.errors import LocaloraError
from localora.scoring.judge import Element, PairScores

ELEMENTS = [
    Element("character", "Kamado Nezuko", "kamado nezuko, black hair, pink eyes, forehead"),
    Element("style", "Hand-drawn Style", "lineart, hand-drawn style"),
]
IMG_A = Image.new("RGB", (8, 8), (255, 0, 0))
IMG_B = Image.new("RGB", (8, 8), (0, 0, 255))


@dataclass
class _Answer:
    value: Any
    text: str = ""


class Scripted:
    """Answers from a rule over (which image is first, seed); records every call."""

    def __init__(self, rule):
        self.rule = rule
        self.calls: list[dict] = []

    def chat(self, system, images, text, schema=None, seed=None, **sampling):
        self.calls.append({"system": system, "images": images, "text": text, "schema": schema, "seed": seed, **sampling})
        first, second = ("a" if images[0] is IMG_A else "b"), ("a" if images[1] is IMG_A else "b")
        s1, s2 = self.rule(first, second, seed)
        value = {"explanation_1": f"{first} first", "explanation_2": f"{second} second", "image_1": s1, "image_2": s2}
        return _Answer(value, json.dumps(value))


def _s(composition: float, quality: float) -> dict[str, float]:
    return {"composition": composition, "quality": quality}


def test_a_judge_that_always_prefers_position_1_gives_a_tie():
    model = Scripted(lambda first, second, seed: (_s(8.0, 7.5), _s(5.0, 4.0)))
    result = judge.judge_pair(model, IMG_A, IMG_B, ELEMENTS)
    assert result.verdict == {"composition": "tie", "quality": "tie"}
    assert result.scores.a == result.scores.b == _s(6.5, 5.75)


def test_a_real_preference_survives_position_bias():
    # +3 for whoever is shown first, and image B is truly 1 point better in composition only.
    true = {"a": _s(6.0, 6.0), "b": _s(7.0, 6.0)}

    def rule(first, second, seed):
        biased = {k: v + 3 for k, v in true[first].items()}
        return biased, true[second]

    result = judge.judge_pair(Scripted(rule), IMG_A, IMG_B, ELEMENTS, repeats=2)
    assert result.verdict == {"composition": "loss", "quality": "tie"}
    assert result.scores.a == _s(7.5, 7.5) and result.scores.b == _s(8.5, 7.5)


def test_both_orders_every_repeat_with_its_own_seed_and_the_prompt():
    model = Scripted(lambda first, second, seed: (_s(5, 5), _s(5, 5)))
    result = judge.judge_pair(model, IMG_A, IMG_B, ELEMENTS, repeats=3, seed=10)
    assert [(c["images"][0] is IMG_A, c["seed"]) for c in model.calls] == [
        (True, 10), (False, 10), (True, 11), (False, 11), (True, 12), (False, 12)
    ]
    assert [x.first for x in result.answers] == ["a", "b"] * 3
    text = model.calls[0]["text"]
    assert "1. character (Kamado Nezuko): kamado nezuko, black hair, pink eyes, forehead\n2. style (Hand-drawn Style): lineart, hand-drawn style" in text
    # The reference criteria: -3 once for any missing element (not per element), further
    # deductions allowed on both dimensions, explanation first, avoid a double tie.
    for criterion in ("Deduct 3 points once if any element is missing or wrongly depicted",
                      "Deduct 1 point for each missing or wrong feature", "minor inconsistency", "lack harmony",
                      "lacks coherence or realism", "Deduct 3 points for each deformity", "texture, lighting or colour",
                      "Deduct 1 point for each minor flaw", "overall aesthetics or clarity", "Evaluate critically",
                      "step by step", "Only then give the four scores", "same score on both dimensions", "0.5"):
        assert criterion in text
    assert "for each element that is missing" not in text
    assert "{" + "elements}" not in text and "{" + "answer_format}" not in text
    assert schemas.judge_answer().describe() in text and model.calls[0]["system"] == judge.system_text()
    assert model.calls[0]["schema"].grammar == schemas.judge_answer().grammar
    # Each answer keeps its explanations, by position, and its text.
    assert [(x.explanation_1, x.explanation_2) for x in result.answers[:2]] == [("a first", "b second"),
                                                                                 ("b first", "a second")]
    # Repeats are sampled (greedy ones would repeat themselves); a single ask is greedy.
    assert {c["temperature"] for c in model.calls} == {judge.REPEAT_TEMPERATURE}
    once = Scripted(model.rule)
    judge.judge_pair(once, IMG_A, IMG_B, ELEMENTS)
    assert all("temperature" not in c for c in once.calls)


def test_aggregate_counts_a_constructed_table():
    table = [
        PairScores(_s(8, 6), _s(6, 6)),      # composition win, quality tie
        PairScores(_s(5, 7.5), _s(5, 7)),    # tie, win
        PairScores(_s(4, 3), _s(6.5, 9)),    # loss, loss
        PairScores(_s(9, 8), _s(8.5, 8.5)),  # win, loss
    ]
    counts = judge.aggregate(table)
    comp, qual = counts["composition"], counts["quality"]
    assert (comp.wins, comp.ties, comp.losses, comp.pairs) == (2, 1, 1, 4)
    assert (qual.wins, qual.ties, qual.losses, qual.pairs) == (1, 1, 2, 4)
    assert comp.win_rate == 0.5 and qual.win_rate == 0.25
    assert comp.mean_a == pytest.approx(6.5) and comp.mean_b == pytest.approx(6.5)
    # A tie margin turns close calls into ties.
    assert judge.aggregate(table, margin=0.5)["quality"].ties == 3


def test_debias_needs_both_orders_equally():
    one_sided = [judge.Asked("a", 0, _s(5, 5), _s(5, 5))]
    with pytest.raises(ValueError, match="both orders"):
        judge.debias(one_sided)


def test_element_parsing_and_formatting():
    e = judge.parse_element("character (Son Goku): son goku, spiked hair")
    assert e == Element("character", "Son Goku", "son goku, spiked hair")
    assert e.line(3) == "3. character (Son Goku): son goku, spiked hair"
    for bad in ("character Son Goku: x", "character (Son Goku):", "no parentheses"):
        with pytest.raises(LocaloraError, match="category \\(Name\\): trigger, words"):
            judge.parse_element(bad)


def test_malformed_or_out_of_range_answers_are_clear_errors():
    with pytest.raises(LocaloraError, match="image_1/image_2"):
        judge.read_scores({"image_1": _s(5, 5)})
    with pytest.raises(LocaloraError, match="outside 0-10"):
        judge.read_scores({"image_1": _s(5, 11), "image_2": _s(5, 5)})
    with pytest.raises(LocaloraError, match="at least one element"):
        judge.judge_prompt([])


def test_an_override_template_is_used_and_must_list_the_elements(tmp_path):
    (tmp_path / "judge.txt").write_text("Check these:\n{elements}\nAnswer as {answer_format}")
    text = judge.judge_prompt(ELEMENTS, tmp_path)
    assert text.startswith("Check these:\n1. character (Kamado Nezuko)") and '"image_2"' in text
    (tmp_path / "judge.txt").write_text("Score the pictures as {answer_format}")
    with pytest.raises(LocaloraError, match="must contain {elements}"):
        judge.judge_prompt(ELEMENTS, tmp_path)


def test_judge_command_with_the_tiny_vlm(tmp_path):
    """End to end through the real tiny Qwen2-VL under the judge grammar."""
    from click.testing import CliRunner

    from localora.cli.evaluate import judge as judge_cmd

    IMG_A.resize((64, 64)).save(tmp_path / "a.png")
    IMG_B.resize((64, 64)).save(tmp_path / "b.png")
    args = [str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--profile", "tiny",
            "--element", "character (Demo Character): demo character, red hair", "--repeats", "1"]
    result = CliRunner().invoke(judge_cmd, args)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[-5].split()[:2] == ["A", str(tmp_path / "a.png")] and lines[-4].split()[0] == "B"
    scores = [float(x) for x in lines[-5].split()[2:] + lines[-4].split()[2:]]
    assert len(scores) == 4 and all(0 <= x <= 10 for x in scores)
    assert re.fullmatch(r"A vs B \(2 answers, both orders\): composition (win|tie|loss), quality (win|tie|loss)", lines[-3])
    for line, d in zip(lines[-2:], judge.DIMENSIONS):
        m = re.fullmatch(rf"A vs B outcomes, {d}: (\d) win / (\d) tie / (\d) loss of 2; win rate \d+% "
                         r"\(95% Wilson \d+%-\d+%\)", line)
        assert m and sum(map(int, m.groups())) == 2, line


@pytest.mark.parametrize("args, fragment", [(["--repeats", "0"], "--repeats 0"),
                                            (["--judge-temperature", "-1"], "--judge-temperature -1")])
def test_judge_command_bad_repeats_or_temperature(tmp_path, args, fragment):
    from click.testing import CliRunner

    from localora.cli import main
    from support import one_error_line

    IMG_A.save(tmp_path / "a.png")
    result = CliRunner().invoke(main, ["judge", str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--profile", "tiny",
                                       "--element", "character (X): x", *args])
    one_error_line(result, fragment, "at least 1" if "repeats" in fragment else "0 (greedy)")


def test_every_repeat_and_order_is_one_outcome():
    # +3 for whoever is shown first, B truly 1 better in composition: the A-first answers are
    # A's wins in composition (6+3 > 7), the B-first ones A's losses; quality: A first wins.
    true = {"a": _s(6.0, 6.0), "b": _s(7.0, 6.0)}
    result = judge.judge_pair(Scripted(lambda f, s, seed: ({k: v + 3 for k, v in true[f].items()}, true[s])),
                              IMG_A, IMG_B, ELEMENTS, repeats=2, seed=7)
    assert [(o.repeat, o.first) for o in result.outcomes] == [(0, "a"), (0, "b"), (1, "a"), (1, "b")]
    assert [o.verdict["composition"] for o in result.outcomes] == ["win", "loss"] * 2
    assert [o.verdict["quality"] for o in result.outcomes] == ["win", "loss"] * 2
    assert result.outcomes[1].a == _s(6.0, 6.0) and result.outcomes[1].b == _s(10.0, 9.0)
    assert (result.outcomes[0].explanation_a, result.outcomes[1].explanation_a) == ("a first", "a second")
    r = result.rates()["composition"]
    assert (r.wins, r.ties, r.losses, r.n, r.win_rate) == (2, 0, 2, 4, 0.5)
    # The averaged view of the same answers: B better in composition, a tie in quality.
    assert result.verdict == {"composition": "loss", "quality": "tie"}


def test_wilson_interval_matches_published_values():
    # 95% Wilson score intervals (Newcombe 1998, table I): 81/263, 15/148, 0/20, 1/29.
    assert judge.wilson(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert judge.wilson(15, 148) == pytest.approx((0.0624, 0.1605), abs=1e-4)
    assert judge.wilson(0, 20) == pytest.approx((0.0, 0.1611), abs=1e-4)
    assert judge.wilson(1, 29) == pytest.approx((0.0061, 0.1718), abs=1e-4)
    assert judge.wilson(0, 0) == (0.0, 1.0)
    ties = judge.rates([{"composition": "tie", "quality": "win"}] * 3 + [{"composition": "win", "quality": "win"}])
    assert ties["composition"].win_rate == 0.25 and ties["composition"].ties == 3  # ties stay in the denominator


def test_the_tiny_vlm_explains_both_images_before_scoring_at_any_seed():
    """Sampled at temperature 1 from the random tiny Qwen2-VL: every answer parses, and its text
    holds both explanations before the first score."""
    from localora import profiles
    from localora.vlm.model import VLM

    vlm = VLM(profiles.load_profile("tiny").vlm)
    a, b = IMG_A.resize((64, 64)), IMG_B.resize((64, 64))
    result = judge.judge_pair(vlm, a, b, ELEMENTS, repeats=3, seed=5)
    assert len(result.answers) == 6 and len({x.text for x in result.answers}) > 1  # sampled, not greedy
    for x in result.answers:
        positions = [x.text.index(f'"{key}":') for key in ("explanation_1", "explanation_2", "image_1", "image_2")]
        assert positions == sorted(positions) and positions[0] == 1, x.text
        assert x.explanation_1 and x.explanation_2
        assert len(x.explanation_1) <= schemas.JUDGE_EXPLANATION_CHARS
        assert schemas.judge_answer().parse(x.text)["image_1"] == x.position_1
