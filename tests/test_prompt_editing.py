"""A1111 prompt editing [from:to:when] and alternation [a|b]: the schedules, and when the model sees what.

Expected schedules are the examples A1111 documents for its prompt parser (modules/prompt_parser.py,
10 steps); the sampling checks follow its rule that model call k (0-based) uses the first schedule
entry whose step is >= k, over twice the steps for second-order samplers.
"""

from __future__ import annotations

import time

import pytest
import torch

import latentforge
from latentforge.conditioning.prompt import MAX_PROMPT_CHARS
from latentforge.conditioning.schedule import prompt_schedule
from latentforge.pipelines.checks import MAX_STEPS
from latentforge.sampling import Cond, CondSchedule
from tiny import build_reference, save_folder

A1111_EXAMPLES = [
    ("test", [(10, "test")]),
    ("a [b:3]", [(3, "a "), (10, "a b")]),
    ("a [b: 3]", [(3, "a "), (10, "a b")]),
    ("a [[[b]]:2]", [(2, "a "), (10, "a [[b]]")]),
    ("[(a:2):3]", [(3, ""), (10, "(a:2)")]),
    ("a [b : c : 1] d", [(1, "a b  d"), (10, "a  c  d")]),
    ("a[b:[c:d:2]:1]e", [(1, "abe"), (2, "ace"), (10, "ade")]),
    ("a [unbalanced", [(10, "a [unbalanced")]),
    ("a [b:.5] c", [(5, "a  c"), (10, "a b c")]),
    ("((a][:b:c [d:3]", [(3, "((a][:b:c "), (10, "((a][:b:c d")]),
    ("[a|(b:1.1)]", [(k, "a" if k % 2 else "(b:1.1)") for k in range(1, 11)]),
    ("[fe|]male", [(k, "female" if k % 2 else "male") for k in range(1, 11)]),
    ("[fe|||]male", [(k, "female" if k % 4 == 1 else "male") for k in range(1, 11)]),
]


@pytest.mark.parametrize("prompt, expected", A1111_EXAMPLES)
def test_schedules_match_a1111s_documented_examples(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


def test_when_is_a_fraction_only_with_a_decimal_point_and_is_capped_at_the_steps():
    assert prompt_schedule("[a:b:0.25]", 20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:1.0]", 20) == [(20, "a")]  # the whole run
    assert prompt_schedule("[a:b:1]", 20) == [(1, "a"), (20, "b")]  # step 1
    assert prompt_schedule("[a:b:50]", 20) == [(20, "a")]
    assert prompt_schedule("[a:b:0]", 20) == [(20, "b")]
    assert prompt_schedule("a | b", 20) == [(20, "a | b")]  # does not parse: used as written


def test_a_when_below_any_float_is_before_the_first_step():
    assert prompt_schedule("[a:b:-1e999]", 10) == [(10, "b")]
    assert prompt_schedule("[a:b:-" + "9" * 400 + ".5]", 10) == [(10, "b")]


# A1111 1.7+ (prompt_parser.get_learned_conditioning_prompt_schedules with hires_steps, the new timeline):
# in the hires pass a step number counts on from the first pass's steps (when - base) and a fraction from
# 1.0 ((when - 1) * hires steps); capped at the hires steps, and below 1: the edit already happened
HIRES_TIMELINE = [  # (prompt, first pass steps, hires steps, schedule of the hires pass)
    ("a [b:.5] c", 10, 10, [(10, "a b c")]),  # A1111's doctest
    ("a [b:1.5] c", 10, 10, [(5, "a  c"), (10, "a b c")]),  # A1111's doctest
    ("[a:b:10]", 20, 10, [(10, "b")]),  # step 10 of the first pass: long done
    ("[a:b:25]", 20, 10, [(5, "a"), (10, "b")]),  # 25 - 20 = step 5 of the hires pass
    ("[a:b:40]", 20, 10, [(10, "a")]),  # 40 - 20 = 20: after the hires pass
    ("[a:b:1.0]", 20, 10, [(10, "b")]),  # the end of the first pass
    ("[a:b:1.25]", 20, 8, [(2, "a"), (8, "b")]),  # 0.25 * 8
    ("[a:b:2.0]", 20, 8, [(8, "a")]),
    ("[a:[b:c:1.5]:21]", 20, 10, [(1, "a"), (5, "b"), (10, "c")]),
    ("[a|b]", 20, 3, [(1, "a"), (2, "b"), (3, "a")]),  # alternation is by the pass's own steps
]


@pytest.mark.parametrize("prompt, first, steps, expected", HIRES_TIMELINE)
def test_hires_pass_schedules_go_on_from_the_first_pass(prompt, first, steps, expected):
    assert prompt_schedule(prompt, steps, first) == expected


def test_schedules_take_time_in_the_edits_not_the_length_times_the_steps():
    calls = 2 * MAX_STEPS  # second-order samplers: two model calls a step
    for prompt in ("[a|b]" + "()" * 9997, "[a|b|c|d][e|f|g|h|i]" + "(x)" * 6600, "[a:b:0.5]" + " " * 19990):
        prompt = prompt[:MAX_PROMPT_CHARS]
        start = time.perf_counter()
        entries = prompt_schedule(prompt, calls)
        assert time.perf_counter() - start < 2.0  # documented: about 0.2 s at the limits
        assert entries[-1][0] == calls


def test_cond_schedule_picks_the_first_entry_not_yet_passed():
    a, b = Cond(torch.zeros(1, 1, 1)), Cond(torch.ones(1, 1, 1))
    sched = CondSchedule([(2, a), (4, b)])
    assert [sched.at(k) is a for k in range(7)] == [True, True, True, False, False, False, False]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return latentforge.load(save_folder(build_reference("sd1", seed=77), tmp_path_factory.mktemp("pe") / "m"))


def _denoised_per_step(pipe, prompt, sampler="Euler", negative=""):
    seen = []
    pipe.txt2img(
        prompt,
        negative_prompt=negative,
        seed=5,
        steps=4,
        width=64,
        height=64,
        sampler=sampler,
        progress=lambda p: seen.append(p.denoised.clone()),
    )
    return seen


def _same(a, b) -> list[bool]:
    return [torch.equal(x, y) for x, y in zip(a, b)]


def test_edit_switches_after_step_when(pipe):
    cube, ball = _denoised_per_step(pipe, "a cube"), _denoised_per_step(pipe, "a ball")
    edited = _denoised_per_step(pipe, "[a cube:a ball:2]")  # calls 0, 1, 2 see "a cube"
    assert _same(edited, cube) == [True, True, True, False]
    assert not any(_same(edited, ball))
    assert _same(_denoised_per_step(pipe, "[a cube:a ball:4]"), cube) == [True] * 4
    assert _same(_denoised_per_step(pipe, "[a cube:a ball:0]"), ball) == [True] * 4


def test_second_order_samplers_count_both_calls_of_a_step(pipe):
    cube = _denoised_per_step(pipe, "a cube", sampler="Heun")
    # schedule over 8 calls, switch after call 2: Heun steps 1 and 2 start with calls 0 and 2
    edited = _denoised_per_step(pipe, "[a cube:a ball:2]", sampler="Heun")
    assert _same(edited, cube) == [True, True, False, False]


def test_alternation_and_negative_prompt_schedules(pipe):
    cube = _denoised_per_step(pipe, "a cube")
    # entries at steps 1..4: calls 0 and 1 use entry 1 ("a cube"), call 2 entry 2 ("a ball")
    assert _same(_denoised_per_step(pipe, "[a cube|a ball]"), cube) == [True, True, False, False]
    plain_negative = _denoised_per_step(pipe, "a cube", negative="blurry")
    edited_negative = _denoised_per_step(pipe, "a cube", negative="[blurry:red:1]")
    assert _same(edited_negative, plain_negative) == [True, True, False, False]
