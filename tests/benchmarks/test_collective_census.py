"""``benchmarks/collectives.py``'s census (``collective_census``) on optimised-HLO text as XLA
prints it."""

from benchmarks.collective_census import activation_moves, collective_census

_HLO = """
  %all-reduce.158 = (f32[32,3,3,64]{3,2,1,0}, /*index=5*/f32[64,3,3,64]{3,2,1,0}) all-reduce(%a, %b), to_apply=%add
  %ag = f32[3,3,64,64]{2,1,0,3} all-gather(%p), dimensions={3}, metadata={op_name="jit(step)/all-reduce(x)"}
  %cp = f32[2,32,32,8]{3,2,1,0} collective-permute-start(%x), source_target_pairs={{0,1}}
  %a2a = (f32[1,1,2,32]{3,2,1,0}, f32[1,1,2,32]{3,2,1,0}) all-to-all(%s0, %s1), channel_id=166
  %rs = f32[16]{0} reduce-scatter(%g), dimensions={0}
  %fusion = f32[2]{0} fusion(%all-gather.3), kind=kLoop, calls=%fused_computation
"""


def test_census_counts_each_collective_once_and_lists_those_that_are_not_reductions():
  counts, moving = collective_census(_HLO)
  assert counts == {
      "all-reduce": 1,
      "all-gather": 1,
      "collective-permute": 1,
      "all-to-all": 1,
      "reduce-scatter": 1,
  }
  assert [m.split()[0] for m in moving] == ["all-gather", "collective-permute", "all-to-all"]
  assert moving[1] == "collective-permute f32[2,32,32,8]{3,2,1,0}"
  # the permute and the all-to-all; gathers and reductions do not count
  assert activation_moves(counts) == 2
