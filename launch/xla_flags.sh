# XLA flags for multi-GPU training, in one place; sourced by the GPU launchers.
# Async collectives + the latency-hiding scheduler let XLA overlap FSDP all-gathers / reduce-scatters and
# ring-attention permutes with compute. Command buffers stay off: they serialise the overlapped streams.
export XLA_FLAGS="${XLA_FLAGS:-} \
 --xla_gpu_enable_latency_hiding_scheduler=true \
 --xla_gpu_enable_command_buffer= \
 --xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
 --xla_gpu_all_gather_combine_threshold_bytes=134217728 \
 --xla_gpu_reduce_scatter_combine_threshold_bytes=134217728"
# NVLink multicast off (the lent machines require it; harmless elsewhere).
export NCCL_NVLS_ENABLE=0
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
