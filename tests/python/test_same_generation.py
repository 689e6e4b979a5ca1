"""``same_generation``: the token-equality check the vLLM tests use, on recorded CI data.

No servers: these run in a second. The accepted case is the one CI recorded (stop 14); each
rejected case changes it in one way that wrong KV, not arithmetic, would.
"""

from __future__ import annotations

import copy

from helpers import REPO  # noqa: F401  (puts kvbridge on sys.path)

from kvbridge.testing.cluster import CompletionResult, same_generation

# test_malformed_push_params_fail_cleanly[whole-bad_host], CI stop 14: P/D against D alone.
GOT = CompletionResult(200, [690, 2990, 4071, 690, 2990, 4071, 1233, 690, 2990, 4071, 1233, 690], top_logprobs=[
    {" M": -7.23513650894165, " bp": -7.30544900894165},
    {" bp": -7.25093412399292, " M": -7.25874662399292},
    {"######": -7.281506538391113, " bp": -7.312756538391113},
    {" M": -7.3757004737854, "strings": -7.3913254737854},
    {" bp": -7.243259429931641, " M": -7.266696929931641},
    {"######": -7.281476974487305, " bp": -7.312726974487305},
    {"strings": -7.383586883544922, " M": -7.387493133544922},
    {" M": -7.249913692474365, "strings": -7.359288692474365},
    {" bp": -7.251000881195068, " M": -7.274438381195068},
    {"######": -7.2814621925354, " bp": -7.3127121925354},
    {"strings": -7.383481502532959, " M": -7.387387752532959},
    {" M": -7.265364170074463, "strings": -7.359114170074463},
])  # fmt: skip
REF = CompletionResult(200, [690, 2990, 4071, 690, 2990, 4071, 1233, 690, 2990, 4071, 690, 2990], top_logprobs=[
    {" M": -7.235156059265137, " bp": -7.305468559265137},
    {" bp": -7.2509446144104, " M": -7.2587571144104},
    {"######": -7.289332389831543, " bp": -7.312769889831543},
    {" M": -7.375688552856445, "strings": -7.391313552856445},
    {" bp": -7.2432146072387695, " M": -7.2666521072387695},
    {"######": -7.281508445739746, " bp": -7.304945945739746},
    {"strings": -7.383632183074951, " M": -7.387538433074951},
    {" M": -7.249906539916992, "strings": -7.359281539916992},
    {" bp": -7.251033306121826, " M": -7.274470806121826},
    {"######": -7.281451225280762, " bp": -7.312701225280762},
    {" M": -7.387370586395264, "strings": -7.387370586395264},
    {" bp": -7.243229389190674, " M": -7.282291889190674},
])  # fmt: skip


def test_identical_tokens_are_the_same_generation() -> None:
    assert same_generation(REF, REF)


def test_a_tie_after_one_bf16_step_elsewhere_is_accepted() -> None:
    assert same_generation(GOT, REF)


def test_two_positions_off_by_a_step_in_ten_are_rejected() -> None:
    got = copy.deepcopy(GOT)
    got.top_logprobs[7] = {k: v + 0.008 for k, v in got.top_logprobs[7].items()}
    assert not same_generation(got, REF)


def test_a_position_off_by_more_than_a_step_is_rejected() -> None:
    got = copy.deepcopy(GOT)
    got.top_logprobs[2] = {k: v + 0.015 for k, v in REF.top_logprobs[2].items()}
    assert not same_generation(got, REF)


def test_a_divergence_without_a_tie_is_rejected() -> None:
    ref = copy.deepcopy(REF)
    ref.top_logprobs[10] = {" M": -7.38, "strings": -7.45}
    assert not same_generation(GOT, ref)


def test_a_divergence_without_logprobs_is_rejected() -> None:
    assert not same_generation(CompletionResult(200, GOT.tokens), CompletionResult(200, REF.tokens))


def test_different_lengths_are_rejected() -> None:
    assert not same_generation(GOT, CompletionResult(200, REF.tokens[:-1], top_logprobs=REF.top_logprobs[:-1]))


def test_a_tie_in_the_first_positions_is_rejected() -> None:
    # The same near-tie as the accepted case, but at position 2: too early to tell
    # numerics from wrong KV.
    got, ref = copy.deepcopy(GOT), copy.deepcopy(REF)
    for r in (got, ref):
        r.tokens = r.tokens[8:]
        r.top_logprobs = r.top_logprobs[8:]
    assert got.tokens[2] != ref.tokens[2] and got.tokens[:2] == ref.tokens[:2]
    assert not same_generation(got, ref)


def test_equal_tokens_with_a_log_probability_off_are_rejected() -> None:
    # Equal tokens prove little on the test model: the log-probabilities are compared too.
    got = copy.deepcopy(REF)
    got.top_logprobs[5] = {k: v + 0.05 for k, v in got.top_logprobs[5].items()}
    assert got.tokens == REF.tokens
    assert not same_generation(got, REF)
    assert same_generation(CompletionResult(200, REF.tokens), CompletionResult(200, REF.tokens)), "no log-probabilities: tokens only"


def test_exact_needs_every_bit_and_the_log_probabilities() -> None:
    assert same_generation(REF, copy.deepcopy(REF), exact=True)
    got = copy.deepcopy(REF)
    k = next(iter(got.top_logprobs[3]))
    got.top_logprobs[3][k] = float.fromhex(got.top_logprobs[3][k].hex()) + 1e-12  # below a bf16 step, not equal
    assert not same_generation(got, REF, exact=True)
    assert same_generation(got, REF), "within the bf16 tolerance"
    assert not same_generation(CompletionResult(200, REF.tokens), CompletionResult(200, REF.tokens), exact=True)
    assert not same_generation(GOT, REF, exact=True), "a near-tie is never exact"
