/* The host micro-kernels (et_kernels_x86.h) as external functions, for the kernels object that TVM's LLVM
 * backend emits for the host library (compilers/host_kernels.py replaces the kernels they cover by calls).
 * Built by compilers/frozen.py with the host C compiler at -O3 -march=native: the header then takes its
 * AVX-512 VNNI path where the CPU has it, plain C elsewhere. */
#include <stdint.h>

#define ET_X86_API /* external linkage */
#include "et_kernels_x86.h"
