"""GeoChat family: task prompts, the box grammar (golden cases from models.md), angle settings."""
from __future__ import annotations

import pytest
import shapely
from shapely.geometry import box

from geochat_qgis.core.errors import GeoChatError, ParseError
from geochat_qgis.core.families import Task, get_family
from geochat_qgis.core.families.llava_v1 import llava_v1_prompt


@pytest.fixture
def geochat():
    return get_family("geochat")


def test_prompts_match_geochat_evaluation(geochat):
    assert geochat.build_prompt("refer", "the white plane") == (
        "[refer] Give me the location of <p> the white plane </p>"
    )
    assert geochat.build_prompt(Task.GROUNDING, "Describe the image.") == (
        "[grounding]Describe the image."
    )
    assert geochat.build_prompt("vqa", "Is there a road?") == (
        "Is there a road?\nAnswer the question using a single word or phrase."
    )
    assert geochat.build_prompt("classify", classes=["forest", "river", " beach "]) == (
        "Classify the image in the following classes: forest, river, beach.\n"
        "Classify the image from the following classes. Answer in one word or a short phrase."
    )
    assert geochat.build_prompt("chat", "  How many cars?  ") == "How many cars?"


def test_identify_region_becomes_the_demo_box(geochat):
    # 504 px tile: the demo's {<8><26><22><37>} is x 40.32-110.88, y 131.04-186.48 pixels
    region = box(40.32, 131.04, 110.88, 186.48)
    prompt = geochat.build_prompt("identify", region=region, tile_size=504)
    assert prompt == "[identify] What is the object present at {<8><26><22><37>|<0>}"


@pytest.mark.parametrize("convention", ["ccw", "cw"])
@pytest.mark.parametrize("theta", [0, 17, 30, 45, 60, 89])
def test_oriented_region_round_trips_through_the_parser(convention, theta):
    family = get_family("geochat", angle_convention=convention)
    answer = family.parse(f"{{<20><30><60><50>|<{theta}>}}", 100)
    (det,) = answer.detections
    assert det.kind == "obox" and det.angle == theta
    assert family.region_box(det.geometry, 100) == f"{{<20><30><60><50>|<{theta}>}}"


def test_ccw_and_cw_rotate_opposite_ways_on_screen():
    # counter-clockwise on screen (y down) lifts the box's right end, clockwise lowers it
    raw = "{<20><45><60><55>|<30>}"
    ccw = get_family("geochat", angle_convention="ccw").parse(raw, 100).detections[0]
    cw = get_family("geochat", angle_convention="cw").parse(raw, 100).detections[0]
    right_end = lambda g: max(g.exterior.coords, key=lambda p: p[0])  # noqa: E731
    assert right_end(ccw.geometry)[1] < 50 < right_end(cw.geometry)[1]
    assert ccw.geometry.area == pytest.approx(40 * 10)
    assert ccw.bbox == cw.bbox == (20.0, 45.0, 60.0, 55.0)


def test_demo_identify_answer_and_multibox_phrases(geochat):
    answer = geochat.parse(
        "There are <p>two planes</p> {<10><20><30><40>|<45>}{ <50> <60><70><80> } parked and "
        "<p>a truck</p>{<1><2><3><4>|<0>}.</s>",
        504,
    )
    assert answer.text == "There are two planes parked and a truck."
    assert [d.label for d in answer.detections] == ["two planes", "two planes", "a truck"]
    assert answer.detections[0].bbox == pytest.approx((50.4, 100.8, 151.2, 201.6))
    assert answer.detections[0].angle == 45
    assert answer.detections[1].angle is None  # the box without angle is kept, not dropped
    assert answer.detections[2].bbox == pytest.approx((5.04, 10.08, 15.12, 20.16))
    assert answer.problems == []
    raw = answer.raw
    start, end = answer.detections[1].span
    assert raw[start:end] == "{ <50> <60><70><80> }"


def test_bare_referring_box_takes_the_default_label(geochat):
    answer = geochat.parse("{<8><26><22><37>}", 504, default_label="white plane")
    (det,) = answer.detections
    assert det.label == "white plane" and det.phrase == "" and det.kind == "box"
    assert shapely.equals(det.geometry, box(40.32, 131.04, 110.88, 186.48))
    assert det.margin == pytest.approx(40.32)
    assert answer.text == ""


def test_values_outside_0_100_are_clipped_and_flagged(geochat):
    answer = geochat.parse("<p>ship</p>{<-5><20><110><40>|<5>}", 200)
    (det,) = answer.detections
    assert det.bbox == (0.0, 40.0, 200.0, 80.0)
    assert "clipped" in det.flags and det.margin == 0
    assert any("clipped" in p for p in answer.problems)


def test_box_wholly_outside_the_tile_is_dropped(geochat):
    # padded 200 x 100 tile: y 0-20 % is pad above the image
    answer = geochat.parse("<p>a</p>{<-10><20><-5><40>} <p>b</p>{<10><2><30><20>}", (200, 100))
    assert answer.detections == [] and len(answer.problems) == 2
    assert all("outside" in p for p in answer.problems)


def test_output_cut_off_mid_box(geochat):
    cut = geochat.parse("A <p>car</p>{<10><20><3", 100)
    assert cut.detections == [] and cut.text == "A car"
    assert any("cut off" in p for p in cut.problems)
    brace = geochat.parse("A <p>car</p> {", 100)
    assert brace.text == "A car" and brace.problems
    angle_cut = geochat.parse("A <p>car</p>{<10><20><30><40>|<4", 100)
    (det,) = angle_cut.detections
    assert det.bbox == (10.0, 20.0, 30.0, 40.0) and det.angle is None
    assert det.flags == ["truncated"]


def test_unreadable_boxes_are_problems_not_errors(geochat):
    answer = geochat.parse("a {<1><two>} b {<5><5>}", 100)
    assert answer.detections == [] and answer.text == "a b"
    assert len(answer.problems) == 2


def test_nested_phrase_tags_take_the_inner_phrase(geochat):
    (det,) = geochat.parse("<p>big <p>red roof</p>{<1><2><3><4>}", 100).detections
    assert det.label == "red roof"


def test_malformed_box_keeps_its_corners(geochat):
    answer = geochat.parse("<p>tank</p>{<10><20><30><40>|45}", 100)
    (det,) = answer.detections
    assert det.bbox == (10.0, 20.0, 30.0, 40.0) and det.angle is None
    assert det.flags == ["malformed"] and answer.text == "tank"


def test_delim_between_boxes_as_in_the_demo(geochat):
    answer = geochat.parse("<p>ships</p> {<1><2><3><4>|<0>}<delim>{<5><6><7><8>|<10>}", 100)
    assert [d.bbox for d in answer.detections] == [(1, 2, 3, 4), (5, 6, 7, 8)]
    assert answer.text == "ships"


def test_zero_size_box_is_widened_to_one_grid_step(geochat):
    (det,) = geochat.parse("{<40><30><40><100>}", 200).detections
    assert det.bbox == (79.0, 60.0, 81.0, 200.0)
    assert det.flags == ["widened"] and det.geometry.is_valid and det.geometry.area == 280


def test_padded_non_square_tile_subtracts_the_pad_offset(geochat):
    # a 200 x 100 tile padded to 200 x 200 (50 px above and below): y 25-75 % -> 0-100 px
    (det,) = geochat.parse("{<0><25><50><75>}", (200, 100)).detections
    assert det.bbox == (0.0, 0.0, 100.0, 100.0)


def test_segment_task_and_bad_settings_are_refused(geochat):
    with pytest.raises(GeoChatError, match="segment"):
        geochat.build_prompt("segment", "roads")
    with pytest.raises(GeoChatError, match="angle convention"):
        get_family("geochat", angle_convention="sideways")
    with pytest.raises(GeoChatError, match="region"):
        geochat.build_prompt("identify")
    with pytest.raises(GeoChatError, match="what to find"):
        geochat.build_prompt("refer", "  ")
    with pytest.raises(ParseError):
        geochat.parse("x", 0)
    with pytest.raises(ParseError):
        geochat.parse(b"bytes", 504)


def test_multi_turn_history_uses_llava_v1(geochat):
    turns = [(geochat.build_prompt("vqa", "Is there water?"), "Yes"), ("Where?", None)]
    prompt = geochat.template(turns)
    assert prompt == llava_v1_prompt(turns)
    assert prompt.endswith("ASSISTANT: Yes</s>USER: Where? ASSISTANT:")
    assert geochat.preprocess.pad_rgb == (122, 116, 104) and geochat.preprocess.size == 504


def _geochat_conversation(turns) -> str:
    """GeoChat's conv_llava_v1.get_prompt (SeparatorStyle.TWO, sep " ", sep2 "</s>"), written out:
    system + sep, then each message "ROLE: text" + seps[i % 2], the open turn "ASSISTANT:"."""
    seps = [" ", "</s>"]
    text = llava_v1_prompt([])[: -1] + seps[0]  # the system prompt
    messages = []
    for index, (user, answer) in enumerate(turns):
        messages += [("USER", ("<image>\n" if index == 0 else "") + user), ("ASSISTANT", answer)]
    for i, (role, message) in enumerate(messages):
        text += f"{role}: {message}{seps[i % 2]}" if message else f"{role}:"
    return text


@pytest.mark.parametrize("turns", [
    [("What is this?", None)],
    [("Is there water?", "Yes"), ("Where?", None)],
    [("a", "b"), ("c", "d"), ("e", None)],
])
def test_prompt_equals_geochat_conversation_string(turns):
    assert llava_v1_prompt(turns) == _geochat_conversation(turns)
    assert "</s> USER" not in llava_v1_prompt(turns)


def test_chat_template_renders_the_same_multi_turn_prompt():
    from jinja2 import Template

    from geochat_qgis.core.weights.geochat_tokenizer import LLAVA_V1_CHAT_TEMPLATE

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is there water?"}]},
        {"role": "assistant", "content": "Yes"},
        {"role": "user", "content": "Where?"},
    ]
    rendered = Template(LLAVA_V1_CHAT_TEMPLATE).render(messages=messages)
    assert rendered == llava_v1_prompt([("Is there water?", "Yes"), ("Where?", None)])
