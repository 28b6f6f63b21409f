"""The benchmark scripts import and refuse bad arguments up front (one line, exit 2).

Their measurements are the GPU's to make (``benchmarks/RESULTS.md``); these checks keep a device
call, a few minutes long, from being spent on a script that no longer imports or parses.
"""

import importlib

import pytest

BENCHMARKS = ("aws", "cpu_loops", "distill", "population", "rst_step")


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_folder_as_out_is_refused_before_anything_runs(name, tmp_path, capsys):
  module = importlib.import_module(f"benchmarks.{name}")
  with pytest.raises(SystemExit) as exit_info:
    module.main(["--quick", "--out", str(tmp_path)])
  error = capsys.readouterr().err
  assert exit_info.value.code == 2 and error.count("\n") == 1
  assert error.startswith(f"error: --out {tmp_path} is a directory")


@pytest.mark.parametrize("arguments, fragment", [
    (["--parts", "outer,nope"], "--parts"),
    (["--outer", "1/vmap"], "outer variant '1/vmap'"),
    (["--outer", "0/vmap/unroll/bfloat16/32"], "outer variant"),
    (["--outer", "1/vmap/unroll/bfloat16/32/chunk0"], "outer variant"),
    (["--outer", "1/vmap/unroll/bfloat16/32/chunk2/chunk4"], "outer variant"),
    (["--outer", "1/vmap/unroll/bfloat16/0/chunk2"], "trajectory_chunk"),
    (["--evaluation", "bfloat16/32/cudnn"], "unknown conv_impl 'cudnn'"),
    (["--evaluation", "bfloat16"], "evaluation variant 'bfloat16'"),
    (["--dataset"], "expected one argument"),
])
def test_distill_benchmark_variants_are_checked_up_front(arguments, fragment, tmp_path, capsys):
  from benchmarks import distill
  out = tmp_path / "report.json"
  with pytest.raises(SystemExit) as exit_info:
    distill.main(["--quick", *arguments, "--out", str(out)])
  error = capsys.readouterr().err
  assert exit_info.value.code == 2 and error.count("\n") == 1 and fragment in error
  assert not out.exists()


def test_cpu_loops_swaps_the_convolution_of_models_built_inside():
  import jax
  from benchmarks import cpu_loops
  from jaxtickets import models, train

  calls = []

  def spy(*args, **kwargs):
    calls.append(kwargs.get("window_strides"))
    return jax.lax.conv_general_dilated(*args, **kwargs)

  def init():
    model = models.get_model("convnet3", num_classes=10, width=4)
    train.init_variables(jax.random.PRNGKey(0), model, (8, 8, 3))

  with cpu_loops.swapped_convolution(spy):
    init()
  assert len(calls) == 3  # ConvNet-3's three convolutions
  init()
  assert len(calls) == 3
