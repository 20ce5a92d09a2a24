"""The vllm tier (issue 23): the project's HF conversion of a tiny GeoChat (head_dim 32, as vLLM's
CPU attention needs) served by vLLM itself, against the transformers backend on the same folder.

``python3 tests/vllm/vllm_env.py --test`` installs vLLM's CPU build into .venv-vllm and runs this
file with GEOCHAT_VLLM_PYTHON naming it; without it every test skips, saying so.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyogrio
import pytest
from vllm_server import MODEL_NAME, VLLM_PYTHON_ENV, VllmServer, vllm_python

from geochat_qgis.cli import main
from geochat_qgis.core.backends.base import Conversation, GenerateOptions
from geochat_qgis.core.backends.openai_http import HttpSettings, OpenAIHttpBackend
from geochat_qgis.core.errors import BackendError
from geochat_qgis.core.weights.tiny import build_tiny_geochat

pytestmark = [
    pytest.mark.slow, pytest.mark.needs_torch,
    pytest.mark.skipif(not vllm_python(), reason=(
        f"{VLLM_PYTHON_ENV} names no Python with vLLM: `python3 tests/vllm/vllm_env.py --test` "
        "installs vLLM's CPU build into .venv-vllm and runs this tier")),
]
QUESTION = "[refer] Give me the location of <p> car </p>"


def _images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {"square 504": rng.integers(0, 256, (504, 504, 3), dtype=np.uint8),
            "non-square": rng.integers(0, 256, (300, 504, 3), dtype=np.uint8),
            "upscaled": rng.integers(0, 256, (336, 336, 3), dtype=np.uint8),
            "downscaled": rng.integers(0, 256, (800, 640, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def hf32(tmp_path_factory) -> Path:
    return build_tiny_geochat(tmp_path_factory.mktemp("tiny") / "hf32", "hf", head_dim=32)


@pytest.fixture(scope="module")
def server(hf32, tmp_path_factory):
    running = VllmServer(hf32, tmp_path_factory.mktemp("vllm") / "vllm.log")
    print(f"vLLM started in {running.start_seconds:.0f} s")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(hf32):
    from geochat_qgis.core.backends.transformers_backend import TransformersBackend

    with TransformersBackend(hf32) as backend:
        yield backend


def _client(server, **settings) -> OpenAIHttpBackend:
    return OpenAIHttpBackend(MODEL_NAME, settings=HttpSettings(base_url=server.url, **settings))


def test_greedy_answers_and_prompt_counts_equal_the_transformers_backend(server, local):
    """Through the plugin's client, four tiles at once: the same prompt token count (one BOS,
    1296 image rows) and the same greedy answer. vLLM holds back a last incomplete UTF-8 byte
    that transformers decodes as U+FFFD, so the texts are compared as a prefix; the token ids
    are compared exactly in the next test."""
    images = _images()
    options = GenerateOptions(max_new_tokens=24)
    with _client(server, max_in_flight=4) as http:
        remote = http.generate(list(images.values()), Conversation.single(QUESTION), options)
    for name, image, answer in zip(images, images.values(), remote):
        (here,) = local.generate([image], Conversation.single(QUESTION), options)
        assert answer.prompt_tokens == here.prompt_tokens == 1415, name
        assert here.text.startswith(answer.text) and len(answer.text) > 10, name
        assert answer.generated_tokens == here.generated_tokens, name


def test_prompt_ids_greedy_ids_and_logprobs_equal_the_transformers_model(server, local):
    """The client's own request body (the 504 px padded PNG, the messages) plus vLLM's token
    ids and log-probabilities: the prompt ids equal the processor's (<s> first, once), the
    greedy ids equal transformers' generate, the top-5 first-token log-probabilities agree."""
    import torch
    from PIL import Image

    from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
    from geochat_qgis.core.vision.preprocess import geochat_image

    http = _client(server)
    model, processor = local.model, local.processor
    for name, image in _images().items():
        body = json.loads(http._payload(image, Conversation.single(QUESTION),
                                        GenerateOptions(max_new_tokens=16), False))
        body.update(return_token_ids=True, logprobs=True, top_logprobs=5,
                    return_tokens_as_token_ids=True)
        choice = (answer := server.chat(body))["choices"][0]
        inputs = processor(images=Image.fromarray(geochat_image(image)),
                           text=llava_v1_prompt([(QUESTION, None)]), return_tensors="pt")
        with torch.inference_mode():
            greedy = model.generate(**inputs, max_new_tokens=16, do_sample=False)
            logprobs = model(**inputs).logits[0, -1].log_softmax(-1)
        prompt = inputs.input_ids[0].tolist()
        assert answer["prompt_token_ids"] == prompt and prompt.count(1) == 1, name
        assert choice["token_ids"] == greedy[0, len(prompt):].tolist(), name
        top = choice["logprobs"]["content"][0]["top_logprobs"]
        gaps = [abs(t["logprob"] - float(logprobs[int(t["token"].split(":")[1])])) for t in top]
        assert max(gaps) < 1e-4, (name, gaps)


def test_another_client_sending_tiles_unresized_gets_the_same_numbers(server, local):
    """A client that sends tiles as they are (any OpenAI client, not the plugin): the server's
    PIL processor (``--mm-processor-kwargs '{"backend": "pil"}'``) pads and resizes as GeoChat
    does; with torchvision's resize an upscaled tile moved the log-probabilities by 4e-4."""
    import torch
    from PIL import Image

    from geochat_qgis.core.backends.images import png_data_uri
    from geochat_qgis.core.backends.messages import chat_messages
    from geochat_qgis.core.families.llava_v1 import llava_v1_prompt
    from geochat_qgis.core.vision.preprocess import geochat_image

    for name in ("upscaled", "non-square"):
        image = _images()[name]
        answer = server.chat({"model": MODEL_NAME, "max_tokens": 1, "temperature": 0,
                              "messages": chat_messages(Conversation.single(QUESTION),
                                                        png_data_uri(image)),
                              "logprobs": True, "top_logprobs": 5,
                              "return_tokens_as_token_ids": True})
        inputs = local.processor(images=Image.fromarray(geochat_image(image)),
                                 text=llava_v1_prompt([(QUESTION, None)]), return_tensors="pt")
        with torch.inference_mode():
            logprobs = local.model(**inputs).logits[0, -1].log_softmax(-1)
        top = answer["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        gaps = [abs(t["logprob"] - float(logprobs[int(t["token"].split(":")[1])])) for t in top]
        assert max(gaps) < 1e-4, (name, gaps)


def test_a_second_prompt_of_a_tile_hits_the_prefix_cache(server):
    image = np.random.default_rng(11).integers(0, 256, (504, 504, 3), dtype=np.uint8)
    options = GenerateOptions(max_new_tokens=2)
    with _client(server) as http:
        http.generate([image], Conversation.single("[refer] the road"), options)
        before = server.metric("vllm:prefix_cache_hits_total")
        http.generate([image], Conversation.single("[refer] the white ship"), options)
    # the ~1,340 tokens the two prompts share (<s>, system, image, "[refer] the") are cached
    # in whole blocks (128 tokens on the CPU build, 16 on a GPU): 1,280 or more
    assert server.metric("vllm:prefix_cache_hits_total") - before >= 1280


def test_detect_with_a_grammar_writes_a_valid_layer(server, data_dir, tmp_path, capsys):
    """``detect --grammar`` over vLLM: the GBNF goes as structured_outputs, so even a random
    tiny model answers boxes, and the layer is written, georeferenced, in the raster's CRS."""
    out = tmp_path / "cars.geojson"
    code = main(["detect", str(data_dir / "cogeo.tif"), "--backend", "openai", "--model",
                 MODEL_NAME, "--server-url", server.url, "--prompt", "car", "--grammar",
                 "--max-in-flight", "4", "--max-new-tokens", "40", "--quiet", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    frame = pyogrio.read_dataframe(out)
    assert len(frame) > 0 and frame.geometry.is_valid.all()
    assert set(frame["label"]) == {"car"} and frame["model"].str.startswith("openai:").all()


def test_a_server_with_another_image_size_fails_with_the_cause(hf32, tmp_path):
    """The issue's case: a processor config of 336 px in front of 504 px weights. vLLM 0.32
    refuses to start so unless told to skip profiling the image encoder; then its engine dies
    on the first image (HTTP 500, then connection refused). The message keeps the 500 and its
    body, says the server stopped and points at the log's image size and chat template."""
    wrong = tmp_path / "hf32-336"
    shutil.copytree(hf32, wrong)
    for name in ("preprocessor_config.json", "processor_config.json"):
        config = json.loads((wrong / name).read_text())
        processor = config.get("image_processor", config)
        processor.update(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        (wrong / name).write_text(json.dumps(config))
    running = VllmServer(wrong, tmp_path / "vllm-336.log", ["--skip-mm-profiling"])
    try:
        image = np.zeros((504, 504, 3), np.uint8)
        with pytest.raises(BackendError) as failure:
            with _client(running, retries=1, backoff=0.5) as http:
                http.generate([image], Conversation.single(QUESTION), GenerateOptions())
    finally:
        running.stop()
    message = str(failure.value)
    assert running.url in message and "HTTP 500: EngineCore encountered an issue" in message
    assert "it has stopped" in message and "504 px" in message and "chat template" in message
    assert "expected 504, got 336" in running.tail(400)  # the cause, in the server's log
