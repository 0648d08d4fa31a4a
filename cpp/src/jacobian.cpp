#include "gradchain/jacobian.hpp"
