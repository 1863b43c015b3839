//! The parallel plan `dp × tp × pp` and its sub-groups.
//!
//! World rank = (pp_index · dp + dp_index) · tp + tp_index: tensor-parallel ranks are
//! neighbours (they talk the most), then data parallel, then pipeline stages (Megatron order).

use crate::{Comm, CommError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

/// A rank's coordinates in a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Coords {
    pub dp: usize,
    pub tp: usize,
    pub pp: usize,
}

/// The three sub-groups one rank belongs to.
pub struct PlanGroups {
    pub coords: Coords,
    /// Ranks holding the same model shard on different data.
    pub dp: Box<dyn Comm>,
    /// Ranks splitting the same layers' tensors.
    pub tp: Box<dyn Comm>,
    /// Ranks holding consecutive pipeline stages.
    pub pp: Box<dyn Comm>,
}

impl Plan {
    pub fn data_parallel(dp: usize) -> Plan {
        Plan { dp, tp: 1, pp: 1 }
    }

    pub fn world_size(&self) -> usize {
        self.dp * self.tp * self.pp
    }

    pub fn coords(&self, rank: usize) -> Coords {
        Coords { tp: rank % self.tp, dp: (rank / self.tp) % self.dp, pp: rank / (self.tp * self.dp) }
    }

    pub fn rank_of(&self, c: Coords) -> usize {
        (c.pp * self.dp + c.dp) * self.tp + c.tp
    }

    /// Splits `world` into this rank's dp, tp and pp groups (collective over `world`).
    pub fn groups(&self, world: &dyn Comm) -> Result<PlanGroups, CommError> {
        if self.dp == 0 || self.tp == 0 || self.pp == 0 || self.world_size() != world.size() {
            return Err(CommError::Invalid {
                op: "plan",
                msg: format!(
                    "dp {} × tp {} × pp {} does not match a world of {} ranks",
                    self.dp,
                    self.tp,
                    self.pp,
                    world.size()
                ),
            });
        }
        let c = self.coords(world.rank());
        let dp = world.split(c.pp * self.tp + c.tp, c.dp)?;
        let tp = world.split(c.pp * self.dp + c.dp, c.tp)?;
        let pp = world.split(c.dp * self.tp + c.tp, c.pp)?;
        Ok(PlanGroups { coords: c, dp, tp, pp })
    }
}
