# Rewrites a kernel source for the CUDA emulator (cmake -DIN=... -DOUT=... -P this file):
#   kernel<<<grid, block, smem, stream>>>(args)
#     -> kernel | ::kvmem::cuda_emu::LaunchConfig(grid, block, smem, stream)
#               || ::kvmem::cuda_emu::KernelArgs(args)
#   extern __shared__ [__align__(N)] T name[];
#     -> T* name = reinterpret_cast<T*>(::kvmem::cuda_emu::DynamicShared());
#   __shared__ T name[N]...;
#     -> static thread_local T name[N]...; ::kvmem::cuda_emu::PoisonShared(name, sizeof(name));
# A #line directive keeps errors and the emulator's messages pointing at the original file.
file(READ "${IN}" text)
string(REPLACE "<<<" "| ::kvmem::cuda_emu::LaunchConfig(" text "${text}")
string(REPLACE ">>>(" ") || ::kvmem::cuda_emu::KernelArgs(" text "${text}")
string(REGEX REPLACE "extern __shared__ __align__\\([0-9]+\\) " "extern __shared__ " text "${text}")
string(REGEX REPLACE "extern __shared__ ([A-Za-z_0-9:]+) ([A-Za-z_0-9]+)\\[\\];"
       "\\1* \\2 = reinterpret_cast<\\1*>(::kvmem::cuda_emu::DynamicShared());" text "${text}")
# Static shared variables: a per-host-thread static (blocks run one at a time), filled with
# 0xff by the first of the block's threads to reach it, as fresh shared memory holds garbage.
string(REGEX REPLACE "__shared__ ([^;=]*[^ ;=]) ([A-Za-z_][A-Za-z_0-9]*)((\\[[^];]*\\])*);"
       "static thread_local \\1 \\2\\3; ::kvmem::cuda_emu::PoisonShared(&\\2, sizeof(\\2));"
       text "${text}")
if(text MATCHES "<<<|>>>|__shared__")
  message(FATAL_ERROR "${IN}: a kernel launch or __shared__ declaration the emulator's rewrite "
                      "does not know (write launches as kernel<<<...>>>(args), and declare one "
                      "shared variable per statement)")
endif()
file(WRITE "${OUT}.tmp" "#line 1 \"${IN}\"\n${text}")
file(COPY_FILE "${OUT}.tmp" "${OUT}" ONLY_IF_DIFFERENT)
file(REMOVE "${OUT}.tmp")
