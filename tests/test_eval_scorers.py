"""The six scorers on hand-built cases (edge cases from the reference) and on real POPE predictions."""
import json
from pathlib import Path

import pytest

from mobilevlm.errors import DataError
from mobilevlm.eval import gqa, mmbench, mme, pope, sqa, textvqa
from mobilevlm.eval.answer_processor import normalize_answer
from mobilevlm.eval.records import read_answers
from mobilevlm.eval.scoring import score_file

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "llava-v1.5-13b"


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def answer(question_id, text, prompt=""):
    return {"question_id": question_id, "prompt": prompt, "text": text, "_file": "answers.jsonl", "_line": 1}


# ---------------------------------------------------------------- POPE
@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("No", "no"), ("no.", "no"), ("No, there is none", "no"),
    ("Yes, there is no dog.", "no"),         # "no" inside the first sentence
    ("Yes. No", "yes"),                      # only the first sentence counts
    ("There is not a dog", "no"), ("Not really", "yes"), ("NO", "yes"),  # case-sensitive words
    ("nope", "yes"), ("", "yes"),
])
def test_pope_parse(text, expected):
    assert pope.parse_answer(text) == expected


def pope_tree(root: Path, labels=("yes", "no", "yes", "no")):
    questions = [{"question_id": i + 1, "image": f"img{i // 2}.jpg", "text": f"Is there a thing{i}?\nAnswer the question using a single word or phrase.",
                  "category": "adversarial" if i < 2 else "random"} for i in range(4)]
    write_jsonl(root / "pope" / "llava_pope_test.jsonl", questions)
    for category, rows in (("adversarial", questions[:2]), ("random", questions[2:])):
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{category}.json",
                    [{"question_id": j, "image": q["image"], "text": q["text"].split("\n")[0], "label": labels[q["question_id"] - 1]}
                     for j, q in enumerate(rows)])
    return questions


def test_pope_per_category_and_missing(tmp_path):
    pope_tree(tmp_path)
    full = pope.score([answer(1, "Yes"), answer(2, "No"), answer(3, "Yes"), answer(4, "Yes")], tmp_path)
    assert full["categories"]["adversarial"]["f1"] == pytest.approx(100.0)
    assert full["categories"]["random"]["f1"] == pytest.approx(200 / 3)  # P = 1/2, R = 1
    assert full["score"] == pytest.approx((100 + 200 / 3) / 2)
    # A missing answer stays in the denominator as a wrong one; unknown ids are listed.
    partial = pope.score([answer(1, "Yes"), answer(3, "Yes"), answer(4, "No"), answer(99, "Yes")], tmp_path)
    assert partial["missing"] == {"count": 1, "ids": ["2"]}
    assert partial["unknown"] == {"count": 1, "ids": [99]}
    assert partial["categories"]["adversarial"]["FP"] == 1
    assert partial["n_questions"] == 4


def test_pope_label_files_out_of_step(tmp_path):
    pope_tree(tmp_path)
    random_file = tmp_path / "pope" / "coco" / "coco_pope_random.json"
    rows = [json.loads(line) for line in random_file.read_text().splitlines()]
    write_jsonl(random_file, rows[::-1])
    with pytest.raises(DataError, match=r"coco_pope_random.json:1: does not match"):
        pope.score([], tmp_path)
    write_jsonl(random_file, rows + rows[:1])
    with pytest.raises(DataError, match=r"coco_pope_random.json: 3 labels but 2 questions"):
        pope.score([], tmp_path)


@pytest.mark.skipif(not FIXTURES.is_dir(), reason="shared POPE fixture (LLaVA-1.5-13B predictions) not present")
def test_pope_reproduces_llava_13b():
    metrics = score_file("pope", FIXTURES / "pope" / "llava-v1.5-13b.jsonl", FIXTURES)
    assert round(metrics["score"], 1) == 85.9
    f1 = {name: round(m["f1"], 2) for name, m in metrics["categories"].items()}
    assert f1 == {"adversarial": 84.46, "popular": 86.25, "random": 87.14}
    assert [metrics["categories"]["popular"][k] for k in ("TP", "FP", "TN", "FN")] == [1182, 59, 1441, 318]
    assert metrics["missing"]["count"] == 0 and metrics["n_questions"] == 8910


# ---------------------------------------------------------------- ScienceQA
@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B. the moon", "B"), ("The answer is C.", "C"), ("The answer is C and more", "C"),
    ("The answer is B", "FAILED"),            # the unescaped dot still needs one more character
    ("B is the run-on sentence.", "FAILED"), ("Cinder", "FAILED"), ("a", "FAILED"), (" A", "FAILED"),
    ("The answer is A. The answer is B.", "FAILED"),  # two matches
    ("The answer is Z.", "Z"),
])
def test_sqa_letter_extraction(text, letter):
    assert sqa.extract_letter(text) == letter


def sqa_tree(root: Path):
    problems = {
        "1": {"question": "q1", "choices": ["x", "y"], "answer": 1, "image": "image.png", "hint": ""},
        "2": {"question": "q2", "choices": ["x", "y", "z"], "answer": 0, "image": None, "hint": ""},
        "3": {"question": "q3", "choices": ["x", "y"], "answer": 0, "image": "image.png", "hint": ""},
        "9": {"question": "train", "choices": ["x"], "answer": 0, "image": None, "hint": ""},
    }
    (root / "sqa").mkdir(parents=True)
    (root / "sqa" / "problems.json").write_text(json.dumps(problems))
    (root / "sqa" / "pid_splits.json").write_text(json.dumps({"test": ["1", "2", "3"], "train": ["9"]}))


def test_sqa_img_accuracy_and_missing(tmp_path):
    sqa_tree(tmp_path)
    image_prompt = "<image>\nq\nAnswer with the option's letter from the given choices directly."
    result = sqa.score([answer("1", "B", image_prompt), answer("2", "A", "q"), answer("3", "C", image_prompt)], tmp_path)
    # "C" is beyond problem 3's two choices, so it is wrong even before comparing.
    assert (result["img_correct"], result["img_total"], result["correct"]) == (1, 2, 2)
    assert result["score"] == pytest.approx(50.0)
    # Without an answer, problem 3 is still an image question (from problems.json), scored FAILED.
    result = sqa.score([answer("1", "B", image_prompt), answer("2", "A", "q"), answer("7", "A")], tmp_path)
    assert result["img_total"] == 2 and result["failed_extractions"] == 1
    assert result["missing"]["ids"] == ["3"] and result["unknown"]["ids"] == ["7"]


# ---------------------------------------------------------------- GQA
def test_gqa_exact_match_after_conversion(tmp_path):
    questions = {
        "1": {"answer": "yes", "isBalanced": True, "types": {"structural": "verify"}},
        "2": {"answer": "left", "isBalanced": True, "types": {"structural": "query"}},
        "3": {"answer": "red", "isBalanced": True, "types": {"structural": "query"}},
        "4": {"answer": "no", "isBalanced": False, "types": {"structural": "verify"}},
    }
    (tmp_path / "gqa").mkdir()
    (tmp_path / "gqa" / "testdev_balanced_questions.json").write_text(json.dumps(questions))
    assert gqa.convert_prediction("Left..") == "left"
    assert gqa.convert_prediction(" Yes. ") == " yes. "  # only trailing periods go, no whitespace strip
    result = gqa.score([answer("1", "Yes."), answer("2", "the left"), answer(4, "no")], tmp_path)
    assert result["correct"] == 1 and result["score"] == pytest.approx(100 / 3)
    assert result["binary_accuracy"] == 100.0 and result["open_accuracy"] == 0.0
    assert result["missing"]["ids"] == ["3"] and result["unknown"]["ids"] == [4]  # 4 is not balanced


# ---------------------------------------------------------------- MME
@pytest.mark.parametrize("text, label", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("Not sure", "no"), ("None", "no"),
    ("Church", "other"), ("The answer is yes", "other"), ("", "other"),
])
def test_mme_label(text, label):
    assert mme.label(text) == label


def mme_tree(root: Path):
    suffix = "\nAnswer the question using a single word or phrase."
    base = root / "mme" / "images"
    (base / "color").mkdir(parents=True)
    (base / "color" / "001.txt").write_text("Is it red? Please answer yes or no.\tYes\nIs it blue? Please answer yes or no.\tNo\n")
    (base / "color" / "002.txt").write_text("Is it green?  Please answer yes or no.\tYes\nIs it pink? Please answer yes or no.\tNo\n")
    (base / "artwork" / "images").mkdir(parents=True)
    (base / "artwork" / "questions_answers_YN").mkdir()
    (base / "artwork" / "questions_answers_YN" / "7.txt").write_text("Is this by Monet? Please answer yes or no.\tNo\nIs this by Dali? Please answer yes or no.\tYes\n")
    (base / "code_reasoning").mkdir()
    (base / "code_reasoning" / "c.txt").write_text("Does it print 1? Please answer yes or no.\tYes\nDoes it print 2? Please answer yes or no.\tNo\n")
    rows = [("color/001.jpg", "Is it red?"), ("color/001.jpg", "Is it blue?"), ("color/002.jpg", "Is it green?"),
            ("color/002.jpg", "Is it pink?"), ("artwork/images/7.jpg", "Is this by Monet?"), ("artwork/images/7.jpg", "Is this by Dali?"),
            ("code_reasoning/c.png", "Does it print 1?"), ("code_reasoning/c.png", "Does it print 2?")]
    questions = [{"question_id": qid, "image": qid, "text": text + suffix, "category": qid.split("/")[0]} for qid, text in rows]
    write_jsonl(root / "mme" / "llava_mme.jsonl", questions)
    return questions


def test_mme_acc_plus_pairs_and_sums(tmp_path):
    questions = mme_tree(tmp_path)
    texts = ["Yes", "No",        # color/001 both right
             "Yes", "Yes",       # color/002 one right (GT found through the two-space variant)
             "No", "Church",     # artwork: one right, "other" is wrong
             "Yes", "No"]        # cognition subtask: both right
    answers = [answer(q["question_id"], text, q["text"]) for q, text in zip(questions, texts)]
    result = mme.score(answers, tmp_path)
    assert result["subtasks"]["color"] == {"acc": 75.0, "acc_plus": 50.0, "score": 125.0}
    assert result["subtasks"]["artwork"]["score"] == pytest.approx(50.0)
    assert result["perception"] == pytest.approx(175.0) == result["score"]
    assert result["cognition"] == pytest.approx(200.0)
    # Dropping an answer makes it wrong (not absent): color acc 50, acc+ 0... and it is reported.
    result = mme.score(answers[1:], tmp_path)
    assert result["subtasks"]["color"]["score"] == pytest.approx(50.0)
    assert result["missing"] == {"count": 1, "ids": ["color/001.jpg"]}


def test_mme_missing_ground_truth_file(tmp_path):
    mme_tree(tmp_path)
    (tmp_path / "mme" / "images" / "color" / "002.txt").unlink()
    with pytest.raises(DataError, match=r"002.txt: MME ground-truth file not found"):
        mme.score([], tmp_path)


# ---------------------------------------------------------------- TextVQA
@pytest.mark.parametrize("raw, normalized", [
    ("Dakota digital.", "dakota digital"), ("It's a dog", "it 's dog"), ("T-shirt", "t shirt"),
    ("coca - cola", "coca cola"), ("$5.00", "$5.00"), ("None", "0"), ("two dogs", "2 dogs"),
    ("The Beatles", "beatles"), ("U.S.A.", "usa"), ("10,000", "10000"), ("dont", "don't"),
    ("e.g. this", "eg this"), ("(hello)", "hello"), ("50%", "50%"), ("I'm", "i'm"), ("Ive", "ive"),
    ('"Stop"', "stop"), ("12:30", "12:30"), ("x/y", "x y"), ("rock & roll", "rock & roll"), ("What?", "what"),
    ("A" + "." * 40, "a" + "." * 8),
])
def test_textvqa_normalizer_table(raw, normalized):
    assert normalize_answer(raw) == normalized


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_textvqa_soft_accuracy(matches, expected):
    humans = ["cat"] * matches + ["dog"] * (10 - matches)
    assert textvqa.soft_scores(humans).get("cat", 0.0) == pytest.approx(expected)


@pytest.mark.parametrize("prompt, question", [
    ("What is it?\nReference OCR token: a, b\nAnswer the question using a single word or phrase.", "what is it?"),
    ("Reference OCR token: a\nWhat is it?\nAnswer briefly.", "what is it?"),
    ("What Is It?\nAnswer the question using a single word or phrase.", "what is it?"),
    ("OCR tokens: a b Question: What is it? Short answer:", "what is it?"),
    ("just one line", None),
])
def test_textvqa_question_recovery(prompt, question):
    assert textvqa.recover_question(prompt) == question


def test_textvqa_scores_by_image_and_question(tmp_path):
    suffix = "\nReference OCR token: stop\nAnswer the question using a single word or phrase."
    questions = [{"question_id": "img1", "text": "What does the sign say?" + suffix},
                 {"question_id": "img1", "text": "What colour is it?" + suffix},
                 {"question_id": "img2", "text": "What brand?" + suffix}]
    write_jsonl(tmp_path / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", questions)
    data = [{"image_id": "img1", "question": "What does the sign say?", "question_id": 1, "answers": ["stop"] * 2 + ["halt"] * 8},
            {"image_id": "img1", "question": "What colour is it?", "question_id": 2, "answers": ["red"] * 10},
            {"image_id": "img2", "question": "What brand?", "question_id": 3, "answers": ["Coca-Cola"] * 4 + ["coke"] * 6}]
    (tmp_path / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": data}))
    answers = [answer("img1", "STOP.", questions[0]["text"]), answer("img2", "coca cola", questions[2]["text"])]
    result = textvqa.score(answers, tmp_path)
    assert result["score"] == pytest.approx(100 * (0.6 + 0 + 1.0) / 3)
    assert result["missing"] == {"count": 1, "ids": ["img1"]}
    bad = [answer("img1", "x", "no question here")]
    with pytest.raises(DataError, match="cannot find the question"):
        textvqa.score(bad, tmp_path)


# ---------------------------------------------------------------- MMBench
@pytest.mark.parametrize("text, letter", [
    ("A", "A"), ("B.", "B"), ("The answer is C.", "C"), ("(D)", "D"), ("I think D", "D"),
    ("A cat is on the mat", "A"),          # too long for the article "A": falls back to the option text
    ("A B", None), ("Failed to obtain answer via API", None), ("apples and bananas", None),
    ("it is banana", "B"), ("E", "E"),
])
def test_mmbench_can_infer(text, letter):
    assert mmbench.can_infer(text, {"A": "A cat is on the mat", "B": "banana"} if "cat" in text else {"A": "apples", "B": "banana"}) == letter


def write_tsv(path: Path, header, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(str(c) for c in row) + "\n" for row in rows))


def mmbench_tree(root: Path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "l2-category", "split"]
    rows = [
        [0, "Colour?", "", "red", "blue", "None", "", "A", "attr", "", "fine", "dev"],     # "None" cell = missing
        [1, "Shape?", "A hint", "round", "square", "flat", "", "C", "shape", "", "fine", "dev"],
        [1000000, "Colour?", "", "blue", "red", "", "", "B", "attr", "", "fine", "dev"],
        [1000001, "Shape?", "A hint", "square", "flat", "round", "", "B", "shape", "", "fine", "dev"],
        [2000001, "Shape?", "A hint", "flat", "round", "square", "", "A", "shape", "", "fine", "dev"],
    ]
    write_tsv(root / "mmbench" / "mmbench_dev_en_20231003.tsv", header, rows)


def test_mmbench_circular_groups(tmp_path):
    mmbench_tree(tmp_path)
    rows = mmbench.read_tsv(tmp_path / "mmbench" / "mmbench_dev_en_20231003.tsv")
    assert mmbench.options_of(rows[0]) == ["red", "blue"] and mmbench.options_of(rows[1]) == ["round", "square", "flat"]
    answers = [answer(0, "A"), answer(1000000, "B"),                    # question 0: both passes right
               answer(1, "C"), answer(1000001, "B"), answer(2000001, "round")]  # question 1: third pass wrong
    result = mmbench.score(answers, tmp_path)
    assert result["score"] == pytest.approx(50.0) and result["n_main_questions"] == 2
    assert result["single_pass_accuracy"] == pytest.approx(100.0)
    assert result["category"] == {"attr": 100.0, "shape": 0.0}
    result = mmbench.score(answers[:-1] + [answer(2000001, "no idea")], tmp_path)
    assert result["unparsed"] == 1 and result["score"] == pytest.approx(50.0)
    result = mmbench.score(answers[:-1], tmp_path)
    assert result["missing"] == {"count": 1, "ids": ["2000001"]} and result["score"] == pytest.approx(50.0)


# ---------------------------------------------------------------- files and lines
def test_malformed_answer_line_names_file_and_line(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "text": "Yes"}\n\n{"question_id": 2, "text": \n')
    with pytest.raises(DataError, match=r"answers.jsonl:3: malformed JSON line"):
        read_answers(path)
    path.write_text('{"question_id": 1}\n')
    with pytest.raises(DataError, match=r"answers.jsonl:1: missing field\(s\) text"):
        read_answers(path)


def test_missing_benchmark_file_is_named(tmp_path):
    with pytest.raises(DataError, match=r"llava_pope_test.jsonl: benchmark file not found"):
        pope.score([], tmp_path)
    with pytest.raises(DataError, match=r"problems.json: benchmark file not found"):
        sqa.score([], tmp_path)
