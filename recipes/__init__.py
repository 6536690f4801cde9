"""Training tasks (model + data + loss). Recipes hold no memory code: strategies come from config."""
