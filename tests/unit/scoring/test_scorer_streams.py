"""How many batches a scoring actor holds and runs through the model at once (no Ray)."""

from prn_ray.scoring.scorer import concurrent_calls, model_streams


def test_two_batches_in_the_model_on_a_multicore_cpu():
    assert model_streams(2, use_gpu=False) == 2
    assert model_streams(8, use_gpu=False) == 2


def test_one_batch_in_the_model_on_one_core_or_a_gpu():
    assert model_streams(1, use_gpu=False) == 1  # a second batch would only time-share the core
    assert model_streams(4, use_gpu=True) == 1  # the device runs one batch at a time anyway


def test_one_more_call_than_streams_reads_ahead():
    assert concurrent_calls(1) == 2 and concurrent_calls(2) == 3
