"""`experiments.compile.report` reads a compiled GPU module: library calls, Triton fusions and bytes accessed.

The snippet is the shape of what XLA's GPU compiler printed for a 3x3 convolution followed by a
matrix product and a cuBLAS GEMM (abridged); compiling for a GPU needs the CUDA wheels, which CI lacks.
"""

from experiments.compile import report

HLO = """
%gemm_fusion_dot_computation (parameter_0: bf16[131072,64]) -> bf16[131072,64] {
  %parameter_0 = bf16[131072,64]{1,0} parameter(0)
  ROOT %dot.1 = bf16[131072,64]{1,0} dot(%parameter_0, %parameter_0), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.1 (x.1: bf16[32,64,64,64], k.1: bf16[3,3,64,64], w.1: f32[64,64]) -> bf16[32,64,64,64] {
  %k.1 = bf16[3,3,64,64]{3,2,1,0} parameter(1)
  %x.1 = bf16[32,64,64,64]{3,2,1,0} parameter(0)
  %w.1 = f32[64,64]{1,0} parameter(2)
  %cudnn-conv.1 = (bf16[32,64,64,64]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %k.1), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/encoder/conv_general_dilated"}
  %cudnn-conv.2 = (bf16[3,3,64,64]{3,2,1,0}, u8[0]{0}) custom-call(%x.1, %x.1), window={size=64x64 pad=1_1x1_1}, dim_labels=f01b_i01o->01bf, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(f)/transpose(jvp(encoder))/conv_general_dilated"}
  %get-tuple-element.3 = bf16[32,64,64,64]{3,2,1,0} get-tuple-element(%cudnn-conv.1), index=0
  %bitcast.12.0 = bf16[131072,64]{1,0} bitcast(%get-tuple-element.3)
  %gemm_fusion_dot = bf16[131072,64]{1,0} fusion(%bitcast.12.0), kind=kCustom, calls=%gemm_fusion_dot_computation, backend_config={"operation_queue_id":"0","fusion_backend_config":{"kind":"__triton_nested_gemm_fusion","block_level_fusion_config":{"num_warps":"2"}}}
  %cublas-gemm.1 = (f32[64,64]{1,0}, s8[4194304]{0}) custom-call(%w.1, %w.1), custom_call_target="__cublas$gemm"
  ROOT %bitcast.11.0 = bf16[32,64,64,64]{3,2,1,0} bitcast(%gemm_fusion_dot)
}
"""  # noqa: E501 (HLO instructions are one line each)


def test_kernel_counts_by_library():
    counts = report.kernel_counts(HLO)
    assert (counts["cudnn_convolutions"], counts["cublas_gemms"], counts["triton_fusions"]) == (2, 1, 1)
    assert counts["custom_calls"] == {"__cudnn$convForward": 1, "__cudnn$convBackwardFilter": 1, "__cublas$gemm": 1}
    assert counts["fusion_kinds"] == {"__triton_nested_gemm_fusion": 1}


def test_bytes_accessed_by_instruction_and_layer():
    instructions, collectives = report.hlo_traffic(HLO)
    by_name = {i["name"]: i for i in instructions}
    assert "dot.1" not in by_name and not collectives  # inside a fusion: counted as the fusion
    activation, kernel = 32 * 64 * 64 * 64 * 2, 3 * 3 * 64 * 64 * 2
    assert by_name["cudnn-conv.1"]["bytes"] == activation + kernel + activation
    assert by_name["cudnn-conv.1"]["layer"] == "encoder"
    assert by_name["cudnn-conv.2"]["layer"] == "encoder (backward)"
    assert by_name["gemm_fusion_dot"]["bytes"] == 2 * activation
    assert by_name["cublas-gemm.1"]["bytes"] == 3 * 64 * 64 * 4 + 4194304  # with its workspace
    assert all(i["hbm_bytes"] == i["bytes"] for i in instructions)  # a GPU module names no other memory space


TPU_HLO = """
ENTRY %main.2 (x.1: bf16[8,64,64,256]) -> bf16[8,64,64,256] {
  %x.1 = bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %copy-start.1 = (bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)S(1)}, bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%x.1)
  %copy-done.1 = bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.1)
  %fusion.1 = bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)S(1)} fusion(%copy-done.1), kind=kLoop, calls=%fused_computation
  %fusion.2 = bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)} fusion(%fusion.1, %x.1), kind=kLoop, calls=%fused_computation.1
  %slice-start.1 = ((bf16[8,64,64,256]{3,2,1,0:T(8,128)(2,1)}), bf16[1,64,64,256]{3,2,1,0:T(8,128)(2,1)S(1)}, s32[]{:S(2)}) slice-start(%fusion.2), slice={[0:1], [0:64], [0:64], [0:256]}
  ROOT %slice-done.1 = bf16[1,64,64,256]{3,2,1,0:T(8,128)(2,1)S(1)} slice-done(%slice-start.1)
}
"""  # noqa: E501 (HLO instructions are one line each)


def test_hbm_bytes_leave_out_what_the_tpu_keeps_on_chip():
    by_name = {i["name"]: i for i in report.hlo_traffic(TPU_HLO)[0]}
    image = 8 * 64 * 64 * 256 * 2
    # A prefetch into on-chip memory (memory space 1) reads HBM once; a fusion on chip touches no HBM.
    assert by_name["copy-start.1"]["bytes"] == 2 * image and by_name["copy-start.1"]["hbm_bytes"] == image
    assert by_name["fusion.1"]["bytes"] == 2 * image and by_name["fusion.1"]["hbm_bytes"] == 0
    assert by_name["fusion.2"]["bytes"] == 3 * image and by_name["fusion.2"]["hbm_bytes"] == 2 * image
    assert by_name["slice-start.1"]["bytes"] == image // 4 and by_name["slice-start.1"]["hbm_bytes"] == image // 8
    summary = report.hlo_summary(TPU_HLO, top=2)
    assert summary["instruction_bytes"] == 2 * image + 2 * image + 3 * image + image // 4
    assert summary["instruction_hbm_bytes"] == image + 2 * image + image // 8


def test_layer_of_names_the_module_path_without_transformations():
    metadata = 'metadata={op_name="jit(train_step)/transpose(jvp(UniMMAD))/cmoe0/mimoe_k5/shard_map/vmap()/conv"}'
    assert report.layer_of(metadata) == "cmoe0/mimoe_k5 (backward)"


def test_compiler_peak_reads_the_tpu_compilers_out_of_memory_message():
    error = (
        "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
        "(19.93G) exceeds available HBM (15.75G)."
    )
    assert report.compiler_peak(error, 2**30) == 19.93 * 2**30 + 2**30
    assert report.compiler_peak("INTERNAL: some other failure", 2**30) is None


def test_next_batch_predicts_the_boundary_and_stays_inside_the_bracket():
    gib = 2**30
    # Peak = 2 GiB of state + 0.25 GiB an image: 16 GiB holds 56 images.
    peaks = {0: 2 * gib, 8: 4 * gib}
    assert report.next_batch(8, None, peaks, 16 * gib) == 16  # at most double
    assert report.next_batch(32, None, {**peaks, 32: 10 * gib}, 16 * gib) == 56
    assert report.next_batch(56, None, {**peaks, 56: 16 * gib}, 16 * gib) == 57  # at the line: one more
    assert report.next_batch(8, 20, peaks, 16 * gib) == 19  # never at or past a batch that failed
    assert report.next_batch(8, None, {8: 4 * gib}, 16 * gib) == 16  # one peak: doubling
    assert report.next_batch(56, None, {50: 14.36 * gib, 56: 14.43 * gib}, 16 * gib) == 112  # flat: doubling
    assert report.next_batch(0, 9, {}, 16 * gib) == 4  # no peak: bisection
    # A flat peak below and a failure far above: interpolate between them, not one step down from the failure.
    flat = {48: 14.24 * gib, 54: 14.23 * gib, 108: 29.93 * gib}
    assert report.next_batch(54, 108, flat, 16 * gib) == 60
    assert report.next_batch(54, 108, {48: 14.24 * gib, 54: 14.23 * gib}, 16 * gib) == 81  # no line: bisection


COLLECTIVES_HLO = """
%async_collective_fusion.1 (param_0.1: bf16[3,3,16,128]) -> bf16[3,3,128,128] {
  %param_0.1 = bf16[3,3,16,128]{3,2,1,0:T(8,128)(2,1)S(1)} parameter(0)
  ROOT %all-gather.1 = bf16[3,3,128,128]{3,2,1,0:T(8,128)(2,1)} all-gather(%param_0.1), dimensions={2}
}

%all-reduce-scatter.1 (input_0: f32[64,64]) -> f32[8,64] {
  %input_0 = f32[64,64]{1,0:T(8,128)S(1)} parameter(0)
  %all-reduce.1 = f32[64,64]{1,0:T(8,128)} all-reduce(%input_0), to_apply=%add
  %partition-id.1 = u32[] partition-id()
  ROOT %dynamic-slice.1 = f32[8,64]{1,0:T(8,128)S(1)} dynamic-slice(%all-reduce.1, %partition-id.1), dynamic_slice_sizes={8,64}
}

ENTRY %main.3 (k.1: bf16[3,3,16,128], g.1: f32[64,64], b.1: f32[256]) -> f32[8,64] {
  %k.1 = bf16[3,3,16,128]{3,2,1,0:T(8,128)(2,1)} parameter(0)
  %g.1 = f32[64,64]{1,0:T(8,128)} parameter(1)
  %b.1 = f32[256]{0:T(256)} parameter(2)
  %fusion.1 = bf16[3,3,128,128]{3,2,1,0:T(8,128)(2,1)} fusion(%k.1), kind=kCustom, calls=%async_collective_fusion.1
  %all-reduce.2 = f32[256]{0:T(256)} all-reduce(%b.1), to_apply=%add
  ROOT %fusion.2 = f32[8,64]{1,0:T(8,128)S(1)} fusion(%g.1), kind=kCustom, calls=%all-reduce-scatter.1
}
"""  # noqa: E501 (HLO instructions are one line each)


def test_collectives_inside_fusions_and_the_tpus_reduce_scatter():
    collectives = report.hlo_summary(COLLECTIVES_HLO, top=1)["collectives"]
    assert collectives == {
        "all-gather": {"count": 1, "bytes": 3 * 3 * 128 * 128 * 2},  # the gathered kernel
        "all-reduce": {"count": 1, "bytes": 256 * 4},  # not the one inside the reduce-scatter
        "reduce-scatter": {"count": 1, "bytes": 64 * 64 * 4},  # the gradients summed
    }
