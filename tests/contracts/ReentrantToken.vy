# pragma version ~=0.4.3
"""
@title ReentrantToken: a hostile ERC-20 for the escrow tests (never deployed outside tests)
@notice When the armed escrow sends it tokens (`transfer` called by the escrow during a withdrawal),
        it calls back into the escrow to withdraw again before the first withdrawal has finished,
        trying to be paid twice. The callback's failure is swallowed, so the outer withdrawal completes
        and the test can check that exactly one payment left the escrow; `reentered` records whether any
        callback succeeded.
"""

interface Escrow:
    def withdraw_for(account: address): nonpayable


balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
totalSupply: public(uint256)
target: public(address)
armed: public(bool)
attempts: public(uint256)
reentered: public(bool)


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount
    self.totalSupply += amount


@external
def arm(escrow: address, on: bool):
    self.target = escrow
    self.armed = on


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    return True


@external
def transferFrom(owner: address, to: address, amount: uint256) -> bool:
    self.allowance[owner][msg.sender] -= amount
    self.balanceOf[owner] -= amount
    self.balanceOf[to] += amount
    return True


@external
def transfer(to: address, amount: uint256) -> bool:
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[to] += amount
    if self.armed and msg.sender == self.target and self.attempts < 3:
        self.attempts += 1
        ok: bool = raw_call(self.target, abi_encode(to, method_id=method_id("withdraw_for(address)")),
                            revert_on_failure=False)
        if ok:
            self.reentered = True
    return True
