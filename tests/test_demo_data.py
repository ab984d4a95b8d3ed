"""The demo's generated data: deterministic, held-out, and in the exact formats the project's scorers read."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from mobilevlm.demo import benchmarks as B
from mobilevlm.demo import questions as Q
from mobilevlm.demo import trainsets as T
from mobilevlm.demo.scenes import caption, render, sample_scene

SIZES = {"gqa": 6, "sqa": 6, "textvqa": 5, "pope": 3, "mme": 2, "mmbench": 4}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "benchmark_data"
    scenes = T.training_scenes(0, 400)
    keys = B.write_benchmark_data(root, 0, SIZES, scenes)
    return root, scenes, keys


def test_same_seed_same_files_other_seed_other_files(tmp_path, generated):
    root, scenes, _ = generated
    again = tmp_path / "again"
    B.write_benchmark_data(again, 0, SIZES, T.training_scenes(0, 400))
    other = tmp_path / "other"
    B.write_benchmark_data(other, 1, SIZES, T.training_scenes(1, 400))
    assert _tree_digest(again) == _tree_digest(root)
    assert _tree_digest(other) != _tree_digest(root)


def test_training_data_is_deterministic():
    scenes = T.training_scenes(3, 50)
    assert scenes == T.training_scenes(3, 50)
    names = [f"img_{i}.png" for i in range(50)]
    assert T.instruction_samples(scenes, names, 3) == T.instruction_samples(scenes, names, 3)
    assert T.instruction_samples(scenes, names, 3) != T.instruction_samples(scenes, names, 4)


def test_evaluation_images_never_appear_in_training(generated):
    root, scenes, keys = generated
    assert keys and not keys & {s.key() for s in scenes}
    train_pixels = {hashlib.sha256(render(s).tobytes()).hexdigest() for s in scenes}
    eval_files = [p for p in root.rglob("*.png")]
    assert len(eval_files) > 20
    from PIL import Image

    for path in eval_files:
        with Image.open(path) as image:
            assert hashlib.sha256(image.convert("RGB").tobytes()).hexdigest() not in train_pixels, path


def test_held_out_scenes_are_a_fixed_share_kept_out_of_every_training_stream(generated):
    root, _, keys = generated
    drawn = [sample_scene(random.Random(i)) for i in range(4000)]
    share = sum(scene.held_out for scene in drawn) / len(drawn)
    assert abs(share - 1 / 8) < 0.02  # a hash of the key, not the sampler's order
    assert not any(scene.held_out for scene in T.training_scenes(5, 500, stream="bases"))
    by_key = {scene.key(): scene for scene in drawn}
    assert all(by_key[key].held_out for key in keys if key in by_key)
    book = B._SceneBook(0)
    assert all(book.draw(sample_scene, random.Random("probe")).held_out for _ in range(20))


def _gold(benchmark: str, root: Path) -> dict:
    """question key -> reference answer text, read back from the generated files."""
    d = root / benchmark
    if benchmark == "gqa":
        return {qid: q["answer"] for qid, q in json.loads((d / "testdev_balanced_questions.json").read_text()).items()}
    if benchmark == "pope":
        gold = {}
        for path in (d / "coco").glob("coco_pope_*.json"):
            gold.update({str(row["question_id"]): row["label"] for row in map(json.loads, path.read_text().splitlines())})
        return gold
    if benchmark == "sqa":
        return {pid: Q.LETTERS[p["answer"]] for pid, p in json.loads((d / "problems.json").read_text()).items()}
    if benchmark == "mmbench":
        import csv

        with (d / "mmbench_dev_en_20231003.tsv").open() as handle:
            return {row["index"]: row["answer"] for row in csv.DictReader(handle, delimiter="\t")}
    if benchmark == "textvqa":
        data = json.loads((d / "TextVQA_0.5.1_val.json").read_text())["data"]
        return {(a["image_id"], a["question"].lower()): a["answers"][0] for a in data}
    gold = {}
    for txt in (d / "images").rglob("*.txt"):
        for line in txt.read_text().splitlines():
            question, answer = line.split("\t")
            gold[(f"{txt.parent.name}/{txt.stem}.png", question.replace(" Please answer yes or no.", ""))] = answer
    return gold


def _answers(benchmark: str, root: Path, correct: bool) -> list[dict]:
    from mobilevlm.eval.benchmarks import read_items
    from mobilevlm.eval.generate import answer_line

    gold = _gold(benchmark, root)
    lines = []
    for item in read_items(benchmark, root):
        if benchmark == "textvqa":
            key = (item.question_id, item.question.split("\n")[0].lower())
        elif benchmark == "mme":
            key = (item.question_id, item.question.split("\n")[0])
        else:
            key = str(item.question_id)
        answer = gold[key]
        if not correct:
            answer = {"yes": "no", "no": "yes", "Yes": "No", "No": "Yes"}.get(answer, "E" if len(answer) == 1 else "zzz")
        lines.append(answer_line(item, answer, "test"))
    return lines


@pytest.mark.parametrize("bench,perfect", [("gqa", 100), ("sqa", 100), ("textvqa", 100), ("pope", 100),
                                                ("mme", 200 * len(B.MME_SUBTASKS)), ("mmbench", 100)])
def test_every_set_is_read_and_scored_by_the_project_scorers(generated, bench, perfect):
    from mobilevlm.eval.scoring import score_answers

    root = generated[0]
    assert score_answers(bench, _answers(bench, root, True), root)["score"] == pytest.approx(perfect)
    assert score_answers(bench, _answers(bench, root, False), root)["score"] < perfect / 2


def test_layout_matches_the_official_tree(generated):
    root = generated[0]
    for relative in ("gqa/llava_gqa_testdev_balanced.jsonl", "gqa/testdev_balanced_questions.json",
                     "pope/llava_pope_test.jsonl", "pope/coco/coco_pope_adversarial.json", "pope/coco/coco_pope_popular.json",
                     "pope/coco/coco_pope_random.json", "mme/llava_mme.jsonl", "sqa/problems.json", "sqa/pid_splits.json",
                     "sqa/llava_test_CQM-A.json", "mmbench/mmbench_dev_en_20231003.tsv",
                     "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/TextVQA_0.5.1_val.json"):
        assert (root / relative).is_file(), relative
    pope = [json.loads(line) for line in (root / "pope/llava_pope_test.jsonl").read_text().splitlines()]
    assert [row["category"] for row in pope] == sorted((row["category"] for row in pope), key=["adversarial", "random", "popular"].index)
    assert {row["question_id"] for row in pope if row["category"] == "random"} >= {10000001}
    mme = [json.loads(line) for line in (root / "mme/llava_mme.jsonl").read_text().splitlines()]
    assert all(a["question_id"] == b["question_id"] for a, b in zip(mme[::2], mme[1::2]))  # pairs per image


def test_mmbench_circular_copies_rotate_the_options(generated):
    import csv

    with (generated[0] / "mmbench/mmbench_dev_en_20231003.tsv").open() as handle:
        rows = {int(r["index"]): r for r in csv.DictReader(handle, delimiter="\t")}
    main = [i for i in rows if i < 1_000_000]
    assert main
    for i in main:
        copies = [rows[i + k * 1_000_000] for k in range(4) if i + k * 1_000_000 in rows]
        n = sum(bool(rows[i][c]) for c in "ABCD")
        assert len(copies) == n
        right = {r[r["answer"]] for r in copies}
        assert len(right) == 1  # every copy's answer letter points at the same option text
        assert len({r["answer"] for r in copies}) == n  # and the letter moves with the rotation


def test_instruction_data_covers_the_benchmark_prompts_multi_turn_and_text_only():
    scenes = T.training_scenes(0, 300)
    samples = T.instruction_samples(scenes, [f"{i}.png" for i in range(300)], 0)
    humans = [t["value"] for s in samples for t in s["conversations"] if t["from"] == "human"]
    assert any(Q.SHORT_SUFFIX in h for h in humans) and any(Q.LETTER_SUFFIX in h for h in humans)
    assert any("Reference OCR token: " in h for h in humans) and any(h.startswith("<image>\nContext: ") for h in humans)
    assert any(len(s["conversations"]) > 2 for s in samples)
    assert any("image" not in s for s in samples)
    for sample in samples:
        turns = sample["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        tags = sum(t["value"].count("<image>") for t in turns)
        assert tags == (1 if "image" in sample else 0) and (tags == 0 or turns[0]["value"].startswith("<image>\n"))


def test_captions_name_every_object():
    rng = random.Random(5)
    for _ in range(30):
        scene = sample_scene(rng)
        for text in (caption(scene), caption(scene, random.Random(1))):
            for obj in scene.objects:
                assert f"{obj.size} {obj.color} {obj.shape}" in text
            for word in scene.words:
                assert f'"{word.text}" in {word.color}' in text


def test_stage_one_captions_name_the_objects_in_no_fixed_order():
    scenes = [s for s in T.training_scenes(0, 400) if len(s.objects) == 3]
    samples = T.caption_samples(scenes, [f"{i}.png" for i in range(len(scenes))], 0)
    in_reading_order = sum(sample["conversations"][1]["value"] == caption(scene) for scene, sample in zip(scenes, samples))
    assert len(scenes) > 60 and 0.05 < in_reading_order / len(scenes) < 0.35  # 1 of the 6 orders


def _turn_pairs(sample):
    turns = sample["conversations"]
    return [(turns[i]["value"].removeprefix("<image>\n"), turns[i + 1]["value"]) for i in range(0, len(turns), 2)]


def test_instruction_answers_are_balanced_so_priors_do_not_pay():
    scenes = T.training_scenes(0, 400)
    samples = T.instruction_samples(scenes, [f"{i}.png" for i in range(400)], 0)
    answers = [a for s in samples for q, a in _turn_pairs(s) if Q.SHORT_SUFFIX in q and a in ("yes", "no")]
    assert len(answers) > 200 and abs(answers.count("yes") / len(answers) - 0.5) < 0.05
    by_options: dict[int, list[str]] = {}
    for sample in samples:
        for question, letter in _turn_pairs(sample):
            if Q.LETTER_SUFFIX in question:
                by_options.setdefault(sum(line[1:3] == ". " for line in question.split("\n")), []).append(letter)
    for n, letters in by_options.items():
        assert len(letters) > 30 and max(letters.count(x) for x in Q.LETTERS[:n]) / len(letters) < 1 / n + 0.15, (n, letters)
    for sample in samples:  # a repeated question could be answered from the conversation, not the image
        questions = [q for q, _ in _turn_pairs(sample)]
        assert len(questions) == len(set(questions)), sample["id"]


def _present(name: str, scene) -> bool:
    """Whether "red circle", "red object" or "circle" is in the scene."""
    first, _, second = name.partition(" ")
    if second == "object":
        return any(o.color == first for o in scene.objects)
    if not second:
        return any(o.shape == first for o in scene.objects)
    return name in {o.name for o in scene.objects}


def test_existence_questions_are_answered_by_the_image_not_by_their_neighbours():
    scenes = [s for s in T.training_scenes(1, 600) if s.objects]
    samples = T.instruction_samples(scenes, [f"{i}.png" for i in range(len(scenes))], 1, mix=T.Mix(
        short=0, exists=1, yes_no=0, choice=0, ocr=0, caption=0, max_groups=1))
    by_name: dict[str, list[str]] = {}
    lengths = []
    for scene, sample in zip(scenes, (s for s in samples if "image" in s)):
        pairs = _turn_pairs(sample)
        lengths.append(len(pairs))
        confirmed, denied = set(), set()
        for question, answer in pairs:
            name = question.split("Is there a ")[1].split(" in the image")[0]
            assert _present(name, scene) == (answer == "yes"), (question, answer)
            words = set(name.split()) - {"object"}
            # never entailed by an earlier answer: a colour / shape of an object already confirmed, or an
            # object with a colour / shape already denied
            assert not (answer == "yes" and len(words) == 1 and words <= confirmed), pairs
            assert not (len(words) == 2 and words & denied), pairs
            if answer == "yes" and len(words) == 2:
                confirmed |= words
            if answer == "no" and len(words) == 1:
                denied |= words
            by_name.setdefault(name, []).append(answer)
    assert sum(lengths) / len(lengths) > 3  # several independent questions per image
    for name, answers in by_name.items():  # an object's name does not predict its answer
        if len(name.split()) == 2 and name.split()[1] != "object":
            assert len(answers) > 20 and 0.25 < answers.count("yes") / len(answers) < 0.75, (name, answers.count("yes"), len(answers))


def test_yes_no_answers_depend_neither_on_the_turn_nor_on_the_previous_answer():
    scenes = T.training_scenes(0, 1500)
    samples = T.instruction_samples(scenes, [f"{i}.png" for i in range(1500)], 0)
    by_turn: dict[int, list[str]] = {}
    follows = {"yes": [], "no": []}
    for sample in (s for s in samples if "image" in s):
        previous = None
        for turn, (question, answer) in enumerate(_turn_pairs(sample)):
            if answer not in ("yes", "no"):
                continue
            by_turn.setdefault(min(turn, 3), []).append(answer)
            if previous:
                follows[previous].append(answer)
            previous = answer
    for answers in list(by_turn.values()) + list(follows.values()):
        assert len(answers) > 150 and abs(answers.count("yes") / len(answers) - 0.5) < 0.08, (by_turn, follows)


def test_multiple_choice_turns_rotate_the_options_and_move_the_letter():
    scenes = T.training_scenes(2, 200)
    samples = T.instruction_samples(scenes, [f"{i}.png" for i in range(200)], 2, mix=T.Mix(
        short=0, exists=0, yes_no=0, choice=1, ocr=0, caption=0, max_groups=1))
    for sample in (s for s in samples if "image" in s):
        chosen = []
        for question, letter in _turn_pairs(sample):
            options = {line[0]: line[3:] for line in question.split("\n") if line[1:3] == ". "}
            chosen.append(options[letter])
        assert len(chosen) == 2 and chosen[0] == chosen[1]  # the same answer under another letter


def test_reading_samples_answer_from_the_text_alone():
    scenes = T.training_scenes(0, 300)
    for sample in T.reading_samples(scenes, 0, 200):
        assert "image" not in sample
        first = sample["conversations"][0]["value"]
        for question, answer in _turn_pairs(sample):
            if "Reference OCR token: " in question:
                tokens = question.split("Reference OCR token: ")[1].split("\n")[0].split(", ")
                assert answer == tokens[0 if "at the top" in question else 1]
            elif Q.LETTER_SUFFIX in question:
                options = {line[0]: line[3:] for line in question.split("\n") if line[1:3] == ". "}
                assert options[answer] in first
            else:
                assert first.startswith("Context: ")
                if "Is there a" in question:  # the existence answer is in the context's caption
                    name = question.split("Is there a ")[1].split(" in the image")[0]
                    described = first.split("\n")[0].removeprefix("Context: There is ")
                    objects = [part.split(" at the ")[0].split(" ", 2)[2] for part in described.rstrip(".").replace(" and ", ", ").split(", ")]
                    present = any(_present(name, _Named(o)) for o in objects)
                    assert present == (answer == "yes"), (first, question, answer)


class _Named:
    """A scene stand-in built from a caption's "red circle": what `_present` reads."""

    def __init__(self, name: str):
        colour, shape = name.split()
        self.objects = [type("O", (), {"color": colour, "shape": shape, "name": name})()]


def test_language_model_text_is_mostly_lookups():
    samples = T.reading_samples(T.training_scenes(0, 300), 0, 400)
    lookups = [s for s in samples if "Is there a" in s["conversations"][0]["value"]]
    assert 0.7 < len(lookups) / len(samples) < 0.9
    assert sum(len(s["conversations"]) // 2 for s in lookups) / len(lookups) > 3  # several questions per context


def test_every_patch_of_a_shape_shows_which_shape_it_is():
    from mobilevlm.demo.scenes import COLORS, PATTERN_SHADE, PATTERNS, SHAPES, Scene, Shape

    for shape in SHAPES:
        scene = Scene(objects=(Shape("blue", shape, "large", 1, 1, 0, 0),))
        pixels = render(scene).load()
        fill = COLORS["blue"]
        shade = tuple(int(c * PATTERN_SHADE) for c in fill)
        # the 4x4 patch grid cell at the object's centre lies inside every shape: it carries the shape's pattern
        for y in range(44, 48):
            for x in range(44, 48):
                marked = PATTERNS[shape] is not None and PATTERNS[shape](x, y)
                assert pixels[x, y] == (shade if marked else fill), (shape, x, y, pixels[x, y])
    # the four patterns differ within one patch, whichever patch it is
    patches = {shape: tuple(PATTERNS[shape] is not None and PATTERNS[shape](x, y) for y in range(4) for x in range(4))
               for shape in SHAPES}
    assert len(set(patches.values())) == len(SHAPES)
    assert all(PATTERNS[s] is None or PATTERNS[s](x + 4, y + 8) == PATTERNS[s](x, y)
               for s in SHAPES for x in range(4) for y in range(4))


def test_short_question_groups_ask_about_different_things():
    rng = random.Random(0)
    sizes = []
    for scene in T.training_scenes(2, 300):
        chosen = T._short_set(scene, rng)
        sizes.append(len(chosen))
        kinds = [qa.kind for qa in chosen]
        subjects = [qa.subject for qa in chosen if qa.subject]
        assert len(set(kinds)) == len(kinds) and len(set(subjects)) == len(subjects), chosen
        assert all(qa in Q.short_questions(scene) for qa in chosen)
    assert max(sizes) == 3 and sum(sizes) / len(sizes) > 2


def test_pope_answers_are_broken_down_by_what_the_image_holds(tmp_path):
    from mobilevlm.demo.report import pope_yes_by_kind

    asked = [("red circle", "yes"), ("blue star", "yes"), ("green square", "yes"),  # what the image holds
             ("red star", "no"), ("green circle", "no"),  # colour and shape both on other objects
             ("red triangle", "no"),  # colour only
             ("yellow star", "no"), ("purple square", "no"),  # shape only
             ("yellow triangle", "no")]  # neither
    labels = [{"question_id": i + 1, "image": "a.png", "text": f"Is there a {name} in the image?", "label": label}
              for i, (name, label) in enumerate(asked)]
    (tmp_path / "pope" / "coco").mkdir(parents=True)
    (tmp_path / "pope" / "coco" / "coco_pope_random.json").write_text("\n".join(json.dumps(row) for row in labels))
    # a model that checks the colour only (and misses one present object)
    said = {1: "Yes", 2: "No", 3: "Yes", 4: "Yes", 5: "yes.", 6: "Yes", 7: "No", 8: "No", 9: "No"}
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps({"question_id": qid, "text": text}) for qid, text in said.items()))
    by_kind = pope_yes_by_kind(tmp_path, answers)
    assert {kind: (v["questions"], round(v["yes"], 1)) for kind, v in by_kind.items()} == {
        "present": (3, 66.7), "both elsewhere": (2, 100.0), "colour only": (1, 100.0), "shape only": (2, 0.0), "neither": (1, 0.0)}


def test_patch_labels_mark_the_patches_a_shape_half_covers():
    from mobilevlm.demo.scenes import COLORS, SHAPES, Scene, Shape, patch_labels

    # a large square at the centre spans pixels 35..61: patch 8 (32-35) holds one of its four columns, patch 15
    # (60-63) two, so patches 9..15 on each axis are at least half covered, except the corner (15, 15): a quarter
    labels = patch_labels(Scene(objects=(Shape("green", "square", "large", 1, 1, 0, 0),)))
    expected = np.zeros((24, 24), dtype=bool)
    expected[9:16, 9:16] = True
    expected[15, 15] = False
    assert np.array_equal(labels["shape"] > 0, expected)
    assert set(labels["shape"][expected]) == {1 + SHAPES.index("square")}
    assert set(labels["color"][expected]) == {1 + list(COLORS).index("green")} and labels["size"][10, 10] == 2
    assert not labels["word"].any() and not labels["color"][~expected].any()
