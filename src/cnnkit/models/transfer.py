# placeholder until the transfer module lands
