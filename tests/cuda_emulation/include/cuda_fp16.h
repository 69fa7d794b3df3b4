// Stands in for the CUDA toolkit header of this name when device code is compiled as host C++.
#pragma once
#include "../cuda_emulation.h"
