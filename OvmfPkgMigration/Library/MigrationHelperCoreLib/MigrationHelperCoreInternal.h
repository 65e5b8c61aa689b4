/** @file
  Private declarations of MigrationHelperCoreLib.

  SPDX-License-Identifier: BSD-2-Clause-Patent
**/

#ifndef MIGRATION_HELPER_CORE_INTERNAL_H_
#define MIGRATION_HELPER_CORE_INTERNAL_H_

#include <Base.h>
#include <Library/BaseLib.h>
#include <Library/BaseMemoryLib.h>
#include <Library/MigrationHelperCoreLib.h>

#define OVMF_MH_CAPABILITIES  (OVMF_MH_CAP_QUERY | OVMF_MH_CAP_SHUTDOWN)

#endif
