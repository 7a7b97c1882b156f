"""Video-R1 records: reading both file layouts, media-root resolution, validation errors, prompts."""

import json

import pytest

from common.data import (
    DataError,
    build_prompt,
    build_target,
    load_samples,
    require_some_media,
    solution_answer,
    split_records,
)

RECORD = {
    "problem_id": 7, "problem": "What colour is the circle?", "data_type": "video",
    "problem_type": "multiple choice", "options": ["A. red", "B. blue", "C. green", "D. white"],
    "solution": "<answer>C</answer>", "path": "videos/a.mp4", "data_source": "tinyworld",
    "process": "The circle is green. Green is option C.",
}


def record(**changes):
    r = dict(RECORD, **changes)
    return {k: v for k, v in r.items() if v is not ...}


def test_json_list_and_jsonl_give_the_same_samples(tmp_path):
    records = [record(problem_id=1), record(problem_id=2, path="videos/b.mp4")]
    (tmp_path / "d.json").write_text(json.dumps(records))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    a, b = load_samples(tmp_path / "d.json"), load_samples(tmp_path / "d.jsonl")
    assert [s.problem_id for s in a] == ["1", "2"]
    assert [(s.problem_id, s.path) for s in a] == [(s.problem_id, s.path) for s in b]


def test_paths_resolve_against_data_dir_by_default_and_media_root_when_given(tmp_path):
    (tmp_path / "bench").mkdir()
    data = tmp_path / "bench" / "d.json"
    data.write_text(json.dumps([record()]))
    assert load_samples(data)[0].path == (tmp_path / "bench" / "videos" / "a.mp4").resolve()
    assert load_samples(data, media_root=tmp_path / "media")[0].path == (tmp_path / "media/videos/a.mp4").resolve()


def test_split_keeps_media_paths_resolving_wherever_the_parts_go(tmp_path):
    data = tmp_path / "world" / "train.json"
    (data.parent / "videos").mkdir(parents=True)
    records = [record(problem_id=i, path=f"videos/{i}.mp4") for i in range(3)] + [
        record(problem_id=3, path=str(tmp_path / "elsewhere.mp4"))]
    data.write_text(json.dumps(records))
    expected = [s.path for s in load_samples(data)]
    for folder in (data.parent, tmp_path / "runs" / "exp"):  # next to the input, and somewhere else
        folder.mkdir(parents=True, exist_ok=True)
        assert split_records(data, 1, folder / "a.json", folder / "b.json") == (1, 3)
        assert [s.path for s in load_samples(folder / "a.json") + load_samples(folder / "b.json")] == expected
    # Next to the input the records are unchanged; an absolute path is never rewritten.
    assert json.loads((data.parent / "b.json").read_text()) == records[1:]
    assert json.loads((tmp_path / "runs/exp/b.json").read_text())[-1]["path"] == str(tmp_path / "elsewhere.mp4")


def test_a_data_file_none_of_whose_media_exists_is_refused_by_name(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([record(problem_id=1), record(problem_id=2, path="videos/b.mp4")]))
    samples = load_samples(data)  # parsing alone does not look at the files
    with pytest.raises(DataError, match=r"d\.json: none of its 2 media files exists \(the first: .*videos/a\.mp4\)"):
        require_some_media(samples, data)
    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "b.mp4").write_bytes(b"")  # one file there: missing ones are broken videos, skipped
    require_some_media(samples, data)


@pytest.mark.parametrize(
    ("bad", "pattern"),
    [
        (record(problem_type="essay"), r"record 1: problem_type 'essay' is not one of"),
        (record(data_type="audio"), r"record 1: data_type 'audio'"),
        (record(solution=...), r"record 1: missing field\(s\) solution"),
        (record(options=["A. x"]), r"record 1: a multiple-choice record needs at least 2 options"),
        (record(path=""), r"record 1: field 'path' must be a non-empty string"),
        (record(evidence_frames=["3"]), r"record 1: field 'evidence_frames'"),
        ([1, 2], r"record 1: expected an object"),
        (record(problem_id=0), r"record 1: duplicate problem_id '0' \(first at record 0\)"),
    ],
)
def test_invalid_record_error_names_file_and_record_index(tmp_path, bad, pattern):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record(problem_id=0), bad]))
    with pytest.raises(DataError, match=pattern) as e:
        load_samples(path)
    assert str(path) in str(e.value)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record(problem_id=1)) + "\n{not json\n")
    with pytest.raises(DataError, match=r"d\.jsonl: line 2 is not valid JSON"):
        load_samples(path)
    path.write_text(json.dumps(record(problem_id=1)) + "\n" + json.dumps(record(problem_type="x")) + "\n")
    with pytest.raises(DataError, match=r"line 2: problem_type 'x'"):
        load_samples(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_samples(tmp_path / "none.json")
    (tmp_path / "e.json").write_text("  \n")
    with pytest.raises(DataError, match="file is empty"):
        load_samples(tmp_path / "e.json")


def test_prompt_has_question_options_and_type_specific_instruction(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record(), record(problem_id=8, problem_type="numerical", options=[],
                                                 solution="<answer>3.5</answer>")]))
    mc, num = load_samples(path)
    prompt = build_prompt(mc)
    assert prompt.splitlines()[0] == "What colour is the circle?"
    assert all(o in prompt for o in RECORD["options"])
    assert "<think>" in prompt and "<answer>" in prompt and "option letter" in prompt
    assert "Options:" not in build_prompt(num) and "number" in build_prompt(num)


def test_sft_target_wraps_reasoning_and_bare_answer(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([record(), record(problem_id=9, process=None, solution=" B ")]))
    with_process, without = load_samples(path)
    assert solution_answer(with_process) == "C"
    assert build_target(with_process) == "<think>The circle is green. Green is option C.</think><answer>C</answer>"
    assert build_target(with_process, with_reasoning=False) == "<answer>C</answer>"
    assert build_target(without) == "<answer>B</answer>"
