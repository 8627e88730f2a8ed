"""Channel granularity: channel groups from the model graph, the unanimous vote on them
under a parameter or FLOP budget, and the model rebuilt physically smaller."""

from dsparse.sparsity.channel.groups import ChannelGroup, channel_groups
from dsparse.sparsity.channel.shrink import channel_element_masks, channel_meta, shrink_model, zero_pruned_channels
from dsparse.sparsity.channel.vote import BUDGETS, ChannelCost, ChannelVote, solve_channel_vote

__all__ = ["BUDGETS", "ChannelCost", "ChannelGroup", "ChannelVote", "channel_element_masks", "channel_groups",
           "channel_meta", "shrink_model", "solve_channel_vote", "zero_pruned_channels"]
