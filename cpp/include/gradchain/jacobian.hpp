// Jacobian-product tracking (placeholder; being written).
#pragma once
