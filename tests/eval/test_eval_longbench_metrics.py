import pytest

from lmsqueeze.errors import LmsqueezeError
from lmsqueeze.eval.longbench_metrics import (
    classification_score,
    code_sim_score,
    count_score,
    lcs_length,
    normalize_answer,
    qa_f1_score,
    retrieval_score,
    rouge_l,
    score_dataset,
    score_sample,
)


def test_normalize_answer():
    assert normalize_answer("  The Cat, an  apple!  ") == "cat apple"


def test_qa_f1_hand_computed():
    # pred tokens [cat, sat, on, mat], reference [cat, on, mat]: P = 3/4, R = 1, F1 = 6/7
    assert qa_f1_score("The cat sat on the mat.", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1_score("dog", "cat") == 0.0
    # repeated tokens count once per match: pred [a1, a1], ref [a1]: P = 1/2, R = 1 -> 2/3
    assert qa_f1_score("x x", "x") == pytest.approx(2 / 3)


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0


def test_rouge_l_hand_computed():
    # LCS(the quick brown fox jumps / the brown dog jumps high) = [the, brown, jumps] = 3; P = R = 3/5
    assert rouge_l("the quick brown fox jumps", "the brown dog jumps high") == pytest.approx(0.6)
    # LCS([a b c d], [b d e]) = 2: P = 1/2, R = 2/3, F = 4/7
    assert rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert rouge_l("", "a") == 0.0 and rouge_l("x", "y") == 0.0


def test_code_sim_hand_computed():
    # first line without ` # // is "x = foo(1)"; LCS with "x = foo(2)" is 9 chars: 2 * 9 / 20
    assert code_sim_score("```python\n# comment\nx = foo(1)\n", "x = foo(2)") == pytest.approx(0.9)
    assert code_sim_score("\n\nreturn a", "return a") == 1.0
    assert code_sim_score("# only a comment", "x") == 0.0


def test_classification_hand_computed():
    classes = ["Description", "Entity", "Human being", "Human", "Location", "Numeric value"]
    assert classification_score("Type: Location and Entity", "Location", all_classes=classes) == 0.5
    # "Human" is a strict substring of the reference "Human being": dropped, so one match remains
    assert classification_score("Human being", "Human being", all_classes=classes) == 1.0
    assert classification_score("Entity", "Location", all_classes=classes) == 0.0
    with pytest.raises(LmsqueezeError):
        classification_score("x", "y", all_classes=None)


def test_retrieval_and_count_hand_computed():
    assert retrieval_score("Paragraph 3, or maybe Paragraph 12", "Paragraph 3") == 0.5
    assert retrieval_score("no idea", "Paragraph 3") == 0.0
    assert count_score("There are 7 unique paragraphs out of 10", "7") == 0.5
    assert count_score("7", 7) == 1.0


def test_score_sample_takes_the_best_reference_and_first_line_for_few_shot():
    assert score_sample("hotpotqa", "cat on mat", ["dog", "a cat on a mat"]) == 1.0
    # trec is few-shot: only the first line counts
    classes = ["Location", "Entity"]
    assert score_sample("trec", "Location\nEntity", ["Location"], classes) == 1.0
    assert score_sample("trec", "Location Entity", ["Location"], classes) == 0.5
    with pytest.raises(LmsqueezeError):
        score_sample("dureader", "x", ["y"])


def test_score_dataset_is_100_times_the_mean():
    preds = ["The cat sat on the mat.", "dog"]
    assert score_dataset("narrativeqa", preds, [["a cat on a mat"], ["cat"]]) == round(100 * (6 / 7) / 2, 2)
    with pytest.raises(LmsqueezeError):
        score_dataset("narrativeqa", preds, [["x"]])
