# pragma version ~=0.4.3
"""
@title RenderToken: an RNDR-style ERC-20 for dev and test chains
@notice snekmate's audited ERC-20 (with EIP-2612 permit), mintable by its
        deployer only. The minter-management and ownership functions of the
        snekmate module are deliberately NOT exported: the deployer stays the
        one and only minter for the life of the token. On a production chain the
        escrow is configured with the real RNDR token instead.
"""

from ethereum.ercs import IERC20
implements: IERC20

from snekmate.auth import ownable
from snekmate.tokens import erc20

initializes: ownable
initializes: erc20[ownable := ownable]

exports: (
    erc20.transfer,
    erc20.approve,
    erc20.transferFrom,
    erc20.balanceOf,
    erc20.allowance,
    erc20.totalSupply,
    erc20.name,
    erc20.symbol,
    erc20.decimals,
    erc20.burn,
    erc20.burn_from,
    erc20.mint,
    erc20.is_minter,
    erc20.permit,
    erc20.nonces,
    erc20.DOMAIN_SEPARATOR,
    erc20.eip712Domain,
    erc20.owner,
)


@deploy
def __init__(name_: String[25], symbol_: String[5]):
    """
    @dev The deployer becomes the owner and the only minter (snekmate sets
         both at construction; nothing exported can change either).
    """
    ownable.__init__()
    erc20.__init__(name_, symbol_, 18, name_, "1")
